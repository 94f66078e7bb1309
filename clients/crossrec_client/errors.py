"""Errors of the crossrec client: one CrossrecError subclass per gRPC status a caller acts on."""

from __future__ import annotations

import grpc


class CrossrecError(Exception):
    """A failed call: `code` is the gRPC status name, `details` the server's message."""

    def __init__(self, code: str, details: str):
        super().__init__(code, details)
        self.code = code
        self.details = " ".join((details or "").split())

    def __str__(self) -> str:
        return f"{self.code}: {self.details}"


class InvalidArgument(CrossrecError):
    """The request is malformed; the details name the field, the value and the limit."""


class NotFound(CrossrecError):
    """The named object does not exist."""


class Unavailable(CrossrecError):
    """The service cannot be reached, is starting or draining (retries were exhausted)."""


class DeadlineExceeded(CrossrecError):
    """The call's deadline passed; the server dropped the work."""


class ResourceExhausted(CrossrecError):
    """A server queue or concurrency limit is full; back off and retry later."""


class Unauthenticated(CrossrecError):
    """The server refused the credentials (token or client certificate)."""


_ERROR_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_from_rpc(err: grpc.RpcError) -> CrossrecError:
    """The CrossrecError (subclass) for a failed gRPC call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return _ERROR_BY_CODE.get(code, CrossrecError)(code.name, details or "")
