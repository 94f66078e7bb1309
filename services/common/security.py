"""Transport security shared by servers and service-to-service clients: optional TLS, mutual
TLS, and a bearer-token check (constant-time compare; UNAUTHENTICATED on failure).

Health checks and reflection stay open so Kubernetes probes and grpcurl need no token.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def read_token(token_file: str) -> str:
    """The bearer token from `token_file`, else $CROSSREC_AUTH_TOKEN, else "" (auth off)."""
    if token_file:
        return Path(token_file).read_text().strip()
    return os.environ.get("CROSSREC_AUTH_TOKEN", "").strip()


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """TLS when cert+key are given; mutual TLS (client certificates required and verified
    against `client_ca`) when a client CA is given too. None: plaintext."""
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    root = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())],
                                       root_certificates=root,
                                       require_client_auth=bool(client_ca))


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_SERVICES):
            return continuation(handler_call_details)
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong bearer token in the authorization metadata")
        if handler.unary_unary:
            return handler._replace(unary_unary=deny)
        if handler.stream_unary:
            return handler._replace(stream_unary=deny)
        return handler


@dataclass(frozen=True)
class ClientSecurity:
    """How this process dials other crossrec services (and how tools dial crossrec)."""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    token: str = ""

    def channel(self, address: str, options: list | None = None) -> grpc.Channel:
        if not self.tls_ca:
            return grpc.insecure_channel(address, options=options)
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(read(self.tls_ca), read(self.tls_key),
                                             read(self.tls_cert))
        return grpc.secure_channel(address, creds, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()
