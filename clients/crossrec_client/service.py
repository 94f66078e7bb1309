"""What every service client shares: its channel, default deadline, error mapping, raw calls
and health."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.crossrec_client.channels import RetryPolicy, open_channel
from clients.crossrec_client.errors import error_from_rpc

DEFAULT_TIMEOUT_S = 10.0
HEALTH_SERVICE = "grpc.health.v1.Health"


class ServiceClient:
    """One crossrec service behind one channel: subclasses name the SERVICE and its _STUB.
    Calls get `timeout_s` unless given `timeout=`, and fail with a CrossrecError."""
    SERVICE = ""
    _STUB: type = object

    def __init__(self, address: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = RetryPolicy(), tls_ca: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 tls_server_name: str | None = None, token: str | None = None,
                 options: Sequence[tuple[str, Any]] = ()):
        self.address = address
        self.timeout_s = timeout_s
        self.channel, self._base = open_channel(
            address, [self.SERVICE, HEALTH_SERVICE], retry=retry, tls_ca=tls_ca,
            tls_cert=tls_cert, tls_key=tls_key, tls_server_name=tls_server_name, token=token,
            options=options)
        self.stub = self._STUB(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _invoke(self, method: Callable, request, timeout: float | None):
        try:
            return method(request, timeout=self.timeout_s if timeout is None else timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    def call(self, rpc: str, request, *, timeout: float | None = None):
        """Send a raw request message to `rpc` (e.g. "Recommend"); the raw response message."""
        return self._invoke(getattr(self.stub, rpc), request, timeout)

    def health(self, *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of this service: "SERVING", "NOT_SERVING", ...;
        NotFound when the server at this address does not host the service."""
        reply = self._invoke(self._health.Check,
                             health_pb2.HealthCheckRequest(service=self.SERVICE), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self._base.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"
