"""Engine error types and the one table that maps them to gRPC status codes."""


class EngineError(Exception):
    """Base of every error an engine raises on purpose; the message is shown to the caller."""


class InvalidInput(EngineError):
    """The request is malformed: the message names the field, the value and the limit."""


class NotFound(EngineError):
    """The named object does not exist."""


class Overloaded(EngineError):
    """A bounded queue is full; the caller should back off and retry."""


class NotReady(EngineError):
    """The engine is loading, draining, or a dependency is unreachable."""


class BudgetSpent(EngineError):
    """The caller's deadline passed before the work could be done; the work was dropped."""


# Checked in order; the first matching class wins. Status codes by name, so that engines
# (which import this module) never need grpc: services/common/serve.py turns the name into a
# grpc.StatusCode.
_STATUS_BY_ERROR = (
    (InvalidInput, "INVALID_ARGUMENT"),
    (NotFound, "NOT_FOUND"),
    (Overloaded, "RESOURCE_EXHAUSTED"),
    (NotReady, "UNAVAILABLE"),
    (BudgetSpent, "DEADLINE_EXCEEDED"),
)


def status_name(err: BaseException) -> str:
    """gRPC status code name for an error; anything unexpected is INTERNAL."""
    for cls, name in _STATUS_BY_ERROR:
        if isinstance(err, cls):
            return name
    return "INTERNAL"
