"""Channel setup of every crossrec channel (clients' and the services' own calls to each
other): message limits, keepalive, bounded reconnect backoff, gRPC retries, TLS, bearer token
and trace context."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel as traced_channel

from clients.crossrec_client.limits import MAX_MESSAGE_BYTES

# Longest wait between reconnection attempts to a service that went away (see channel_options).
MAX_RECONNECT_BACKOFF_MS = 1_000
# A call is retried only while everything it sent fits this buffer; 4 MiB holds a full
# 1,000-event Ingest batch with long item texts (gRPC's default, 256 KiB, does not).
RETRY_BUFFER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retryPolicy for every method; backoffs get +-20% jitter from gRPC core.

    The defaults ride out a connection reset or a brief restart (about 3 s of retrying in
    all), well inside the default 10 s deadline, so a service that stays down still reports
    UNAVAILABLE rather than DEADLINE_EXCEEDED. gRPC caps max_attempts at 5. CANCELLED is
    retried too: see the module docstring (a call that raced a server's shutdown).
    """
    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE", "CANCELLED")

    def service_config(self, services: Sequence[str]) -> str:
        return json.dumps({"methodConfig": [{
            "name": [{"service": s} for s in services],
            "retryPolicy": {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s:.3f}s",
                "maxBackoff": f"{self.max_backoff_s:.3f}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": list(self.retryable_codes),
            }}]})


HEALTH_SERVICE = "grpc.health.v1.Health"


def channel_options(services: Sequence[str], retry: RetryPolicy | None) -> list[tuple[str, Any]]:
    """Options every crossrec channel gets: message limits, keepalive, reconnect, retries."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Notice a dead peer (e.g. a node gone without FIN) within ~40 s on long calls.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Reconnect sooner than gRPC's 1 s x 1.6 up to 120 s: calls to a channel in backoff
        # fail at once, so the backoff is how long a restarted service stays unreachable. At
        # most 1 s (+-20 % jitter, so clients do not arrive together) finds it within ~1.2 s
        # of its port opening, for one TCP connect a second per channel while it is down.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.primary_user_agent", "crossrec-python-client/1"),
    ]
    if retry is None:
        options.append(("grpc.enable_retries", 0))
    else:
        options += [("grpc.enable_retries", 1),
                    ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
                    ("grpc.service_config", retry.service_config(services))]
    return options


class _Details(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call, also over plaintext channels
    (gRPC's call credentials need TLS; a loopback or mesh-encrypted hop may not have it)."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        return _Details(details, [*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def open_channel(address: str, services: Sequence[str], *, retry: RetryPolicy | None,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, tls_server_name: str | None = None,
                 token: str | None = None, options: Sequence[tuple[str, Any]] = (),
                 trace: bool = True) -> tuple[grpc.Channel, grpc.Channel]:
    """(channel for stubs, underlying channel to close). Secure when a CA or a client
    certificate is given (no CA: the system roots verify the server). `trace`: every call
    carries the caller's OpenTelemetry context (W3C traceparent) and is a client span of the
    global tracer provider (none configured: no span, the context still travels)."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("mutual TLS needs both tls_cert and tls_key")
    opts = channel_options(services, retry) + list(options)
    if tls_server_name:
        opts.append(("grpc.ssl_target_name_override", tls_server_name))
    if tls_ca or tls_cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(tls_ca), private_key=_read(tls_key),
            certificate_chain=_read(tls_cert))
        base = grpc.secure_channel(address, credentials, options=opts)
    else:
        base = grpc.insecure_channel(address, options=opts)
    channel = grpc.intercept_channel(base, _BearerToken(token)) if token else base
    if trace:
        channel = traced_channel(channel, client_interceptor())
    return channel, base
