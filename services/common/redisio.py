"""Redis plumbing shared by fusion's profile store and ranking's catalogue: connection pools
whose commands never wait past the calling thread's deadline, and the durability check.

redis-py has no per-call timeout, only a per-connection socket timeout. `deadline(timeout_s)`
holds a call's deadline in a context variable for the duration of a block, and the pool's
connections (a subclass of the URL's connection class) clamp each connect, send and read to
the time left. A read cut short by the deadline closes its connection (the reply it never
read dies with the socket, so a later command can never read it as its own) and raises
DeadlinePassed, which redis-py does not retry, so no retry runs past the deadline. Without a
deadline, the pool's socket timeout bounds each read and redis-py's retry applies, as usual.
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import contextmanager
from contextvars import ContextVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from services.common.errors import BudgetSpent, NotReady, Overloaded

# Deadline (time.monotonic) of the Redis calls this thread is making; None: no deadline.
_DEADLINE: ContextVar[float | None] = ContextVar("crossrec_redis_deadline", default=None)


class DeadlinePassed(redis.RedisError):
    """The call's deadline passed while it waited on Redis. Deliberately neither a
    ConnectionError nor a TimeoutError: redis-py retries those, and a retry past the deadline
    only keeps the caller waiting."""


class _DeadlineConnection:
    """Mixin over a redis-py connection class: connect, send and read never wait past the
    deadline in _DEADLINE; a read the deadline cut short closes the connection."""

    def _left(self) -> float | None:
        deadline = _DEADLINE.get()
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            self.disconnect()
            raise DeadlinePassed()
        return left

    def _connect(self):
        left = self._left()
        configured = self.socket_connect_timeout
        if left is None or left >= (configured or math.inf):
            return super()._connect()
        self.socket_connect_timeout = left
        try:
            return super()._connect()
        except TimeoutError:  # socket.timeout; redis-py would turn it into a retried error
            raise DeadlinePassed() from None
        finally:
            self.socket_connect_timeout = configured

    def send_packed_command(self, command, check_health=True):
        if not self._sock:
            self.connect_check_health(check_health=False)
        with self._clamped():
            return super().send_packed_command(command, check_health)

    def read_response(self, *args, **kwargs):
        if "timeout" in kwargs:  # the caller's own bound (a poll), not a command's reply
            return super().read_response(*args, **kwargs)
        with self._clamped():
            return super().read_response(*args, **kwargs)

    @contextmanager
    def _clamped(self):
        """The socket timeout cut to the time left for the block; a timeout that the cut
        caused closes the connection and raises DeadlinePassed."""
        left = self._left()
        sock = self._sock
        if left is None or sock is None or left >= (self.socket_timeout or math.inf):
            yield
            return
        previous = sock.gettimeout()
        sock.settimeout(left)
        try:
            yield
        except redis.TimeoutError:
            # Closed even where redis-py would keep it: the reply may still arrive, and a
            # later command on this connection would read it as its own.
            self.disconnect()
            raise DeadlinePassed() from None
        finally:
            if self._sock is sock:
                sock.settimeout(previous)


@functools.cache
def _with_deadlines(connection_class: type) -> type:
    return type(f"Deadline{connection_class.__name__}", (_DeadlineConnection, connection_class),
                {})


def connection_pool(url: str, *, connect_timeout_s: float, socket_timeout_s: float,
                    max_connections: int, retries: int = 2) -> redis.ConnectionPool:
    """A pool for `url` (redis://, rediss://, unix://) whose connections honour `deadline`."""
    # Few quick retries: a refused connection should surface within a second.
    retry = Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.2), retries=retries)
    pool = redis.ConnectionPool.from_url(
        url, socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s,
        max_connections=max_connections, retry=retry, health_check_interval=30)
    # Before the pool makes its first connection; the URL chose the class (TCP, TLS, unix).
    pool.connection_class = _with_deadlines(pool.connection_class)
    return pool


def address(pool: redis.ConnectionPool) -> str:
    """HOST:PORT (or the socket path) of the pool's server, for error messages."""
    kwargs = pool.connection_kwargs
    return kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"


@contextmanager
def deadline(timeout_s: float | None):
    """Commands in the block (this thread) wait at most `timeout_s` from now in all; past it
    they raise DeadlinePassed. None: no deadline."""
    token = _DEADLINE.set(None if timeout_s is None else time.monotonic() + timeout_s)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


@contextmanager
def errors(where: str, max_connections: int, timeout_s: float | None = None,
           resend_note: str = ""):
    """Runs the block under deadline(timeout_s) and maps redis errors to the services' kinds:
    deadline -> BudgetSpent (with `resend_note` for a write that may still land), pool full ->
    Overloaded, unreachable, loading or refusing writes -> NotReady naming `where`."""
    try:
        with deadline(timeout_s):
            yield
    except DeadlinePassed:
        raise BudgetSpent(f"redis at {where} did not answer within the call's budget "
                          f"({timeout_s:.2f} s){resend_note}") from None
    except redis.exceptions.MaxConnectionsError:
        raise Overloaded(f"all {max_connections} redis connections are busy; retry with "
                         "backoff") from None
    except redis.exceptions.BusyLoadingError as err:
        raise NotReady(f"redis at {where} is loading its data: {err}") from err
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise NotReady(f"redis at {where} unreachable: {err}") from err
    except (redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError) as err:
        raise NotReady(f"redis at {where} refused the write: {err}") from err
    except redis.ResponseError as err:
        if str(err).startswith(("MISCONF", "MASTERDOWN")):
            raise NotReady(f"redis at {where} refused the write: {err}") from err
        raise


def check_fsync(client: redis.Redis, where: str, losing: str) -> None:
    """NotReady unless the server runs with `appendonly yes` and `appendfsync always`, so that
    a write is on disk before its reply. `losing` names what would be lost ("events")."""
    try:
        config = client.config_get("append*")
    except redis.ResponseError as err:
        raise NotReady(f"redis at {where}: cannot check durability, CONFIG GET was "
                       f"refused ({err}); pass require_fsync=False only if the server is "
                       "known to run with appendonly yes and appendfsync always") from None
    config = {_text(k): _text(v) for k, v in config.items()}
    for name, wanted in (("appendonly", "yes"), ("appendfsync", "always")):
        if config.get(name) != wanted:
            raise NotReady(f"redis at {where} must run with {name} {wanted} so that a "
                           f"write is fsynced before it is acknowledged, got "
                           f"{name} {config.get(name)!r}; fix the server config or pass "
                           f"require_fsync=False to accept losing acknowledged {losing}")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
