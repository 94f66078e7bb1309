"""Redis plumbing shared by fusion's profile store and ranking's catalogue: clients (one server
or a Redis Cluster) whose commands never wait past the calling thread's deadline, the error
mapping, the durability check, pipelined scripts, the wait for replicas and reply decoding.

redis-py has no per-call timeout, only a per-connection socket timeout. `deadline(timeout_s)`
holds a call's deadline in a context variable for the duration of a block, and the pool's
connections (a subclass of the URL's connection class) clamp each connect, send and read to
the time left. A read cut short by the deadline closes its connection (the reply it never
read dies with the socket, so a later command can never read it as its own) and raises
DeadlinePassed, which redis-py does not retry, so no retry runs past the deadline. Without a
deadline, the pool's socket timeout bounds each read and redis-py's retry applies, as usual.
A cluster client gets the same connections on every node (its per-node pools are of the same
class), so the deadline and the error mapping hold per node; MOVED, ASK and failovers are the
cluster client's own business.
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import contextmanager
from contextvars import ContextVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError
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


class _DeadlinePool(redis.ConnectionPool):
    """A pool whose connections honour `deadline`, whatever class the URL chose (TCP, TLS,
    unix). RedisCluster builds one per node through its `connection_pool_class`, so the
    deadline applies to every node's connections alike."""

    def __init__(self, connection_class=redis.Connection, **kwargs):
        super().__init__(connection_class=_with_deadlines(connection_class), **kwargs)


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

Client = redis.Redis | redis.RedisCluster


def client(url: str, *, connect_timeout_s: float, socket_timeout_s: float,
           max_connections: int, retries: int = 2) -> Client:
    """A client for `url` whose commands honour `deadline`.

    redis://, rediss://, unix://: one server. redis+cluster://HOST:PORT (rediss+cluster://
    for TLS): a Redis Cluster, discovered from that seed node (any node of the cluster; the
    client learns the others and follows MOVED/ASK and failovers itself, redis-py's
    RedisCluster). Cluster: `max_connections` is per node, and `retries` are the cluster
    client's own (after a refresh of its slot map), node connections never retry.
    """
    # Few quick retries: a refused connection should surface within a second.
    backoff = ExponentialWithJitterBackoff(base=0.02, cap=0.2)
    if url.startswith(CLUSTER_SCHEMES):
        return redis.RedisCluster.from_url(
            url.replace("+cluster", "", 1), connection_pool_class=_DeadlinePool,
            socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s,
            max_connections=max_connections, retry=Retry(backoff, retries=retries))
    pool = _DeadlinePool.from_url(
        url, socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s,
        max_connections=max_connections, retry=Retry(backoff, retries=retries),
        health_check_interval=30)
    return redis.Redis.from_pool(pool)  # close() then disconnects the pool


def address(client: Client) -> str:
    """HOST:PORT (or the socket path) of the server, for error messages; for a cluster, the
    seed node followed by "(cluster)"."""
    if isinstance(client, redis.RedisCluster):
        return f"{client.startup_nodes[0].name} (cluster)"
    kwargs = client.connection_pool.connection_kwargs
    return kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"


def as_text(value) -> str:
    """A reply field as str: bytes (the clients do not decode replies) as UTF-8, anything
    else (a number, a str) through str()."""
    return value.decode() if isinstance(value, bytes) else str(value)


def nodes(client: Client) -> list[tuple[str, redis.Redis]]:
    """(HOST:PORT, a client of that server alone) of every server: the one server, or every
    node the cluster client knows now: its primaries, and the replicas CLUSTER SLOTS lists
    (a replica that has not yet reported a replication offset, just after it joined, is
    not among them)."""
    if isinstance(client, redis.RedisCluster):
        return [(node.name, client.get_redis_connection(node)) for node in client.get_nodes()]
    return [(address(client), client)]


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
    def spent() -> BudgetSpent:
        return BudgetSpent(f"redis at {where} did not answer within the call's budget "
                           f"({timeout_s:.2f} s){resend_note}")

    try:
        with deadline(timeout_s):
            yield
    except DeadlinePassed:
        raise spent() from None
    except redis.exceptions.MaxConnectionsError:
        raise Overloaded(f"all {max_connections} redis connections are busy; retry with "
                         "backoff") from None
    except redis.exceptions.BusyLoadingError as err:
        raise NotReady(f"redis at {where} is loading its data: {err}") from err
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise NotReady(f"redis at {where} unreachable: {err}") from err
    except (redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError) as err:
        raise NotReady(f"redis at {where} refused the write: {err}") from err
    except (redis.exceptions.ClusterError, redis.exceptions.AskError,
            redis.exceptions.TryAgainError) as err:
        # CLUSTERDOWN, MASTERDOWN, or a MOVED/ASK/TRYAGAIN left after the cluster client's
        # own retries: slots are changing hands (a failover, a resharding).
        raise NotReady(f"redis at {where}: the cluster is changing ({err}); retry") from err
    except redis.exceptions.RedisClusterException as err:
        # The cluster client's own errors: no node answered, or slots uncovered, while it
        # refreshed its map of the cluster; anything else (a cross-slot call) is a bug.
        if isinstance(err.__cause__, DeadlinePassed):
            raise spent() from None
        if isinstance(err, redis.exceptions.SlotNotCoveredError) or str(err).startswith(
                ("Redis Cluster cannot be connected", "All slots are not covered")):
            raise NotReady(f"redis at {where} unreachable: {err}") from err
        raise
    except redis.ResponseError as err:
        if str(err).startswith(("MISCONF", "MASTERDOWN")):
            raise NotReady(f"redis at {where} refused the write: {err}") from err
        raise


def check_fsync(client: Client, where: str, losing: str) -> None:
    """NotReady unless every server (each node of a cluster the client knows, see `nodes`)
    runs with `appendonly yes` and `appendfsync always`, so that a write is on disk before
    its reply. `losing` names what would be lost ("events")."""
    for name, server in nodes(client):
        named = where if name in where else f"{where}, node {name}"
        try:
            config = server.config_get("append*")
        except redis.ResponseError as err:
            raise NotReady(f"redis at {named}: cannot check durability, CONFIG GET was "
                           f"refused ({err}); pass require_fsync=False only if the server is "
                           "known to run with appendonly yes and appendfsync always") from None
        config = {as_text(k): as_text(v) for k, v in config.items()}
        for option, wanted in (("appendonly", "yes"), ("appendfsync", "always")):
            if config.get(option) != wanted:
                raise NotReady(f"redis at {named} must run with {option} {wanted} so that a "
                               f"write is fsynced before it is acknowledged, got "
                               f"{option} {config.get(option)!r}; fix the server config or "
                               f"pass require_fsync=False to accept losing acknowledged "
                               f"{losing}")


def route(client: Client, key: str) -> dict:
    """Options for a pipelined EVALSHA with `key` among its keys: on a cluster, the node the
    client's slot map gives the key (redis-py's cluster pipeline would otherwise ask a server
    for the command's keys, COMMAND GETKEYS, one blocking round trip per call, before it
    routes it). A stale map is the library's to mend: the node answers MOVED, the pipeline
    re-sends that call routed by its keys."""
    if isinstance(client, redis.RedisCluster):
        return {"target_nodes": client.get_node_from_key(key)}
    return {}


def load_scripts(client: Client, *scripts) -> None:
    """SCRIPT LOAD each registered script (on every primary of a cluster) ahead of its first
    call: a call that meets NOSCRIPT reloads it everywhere, so on a cluster it would wait on
    every primary, not only its own. After a restart or a failover NOSCRIPT still happens,
    once per script, and the callers reload."""
    for script in scripts:
        script.sha = client.script_load(script.script)


def pipeline_scripts(client: Client, script, calls: list[tuple[list, list]]) -> list:
    """Run the registered `script` once per (keys, args) in one non-transactional round
    trip (one per node on a cluster); the answers in the calls' order.

    EVALSHA straight into the pipeline: redis-py's pipeline script support would add a
    SCRIPT EXISTS round trip per call. After a server restart, a SCRIPT FLUSH or a
    failover to a replica the calls answer NOSCRIPT without running; those (only) are
    re-sent after a SCRIPT LOAD (on every primary of a cluster). A cluster pipeline
    refuses the `evalsha` method but sends the EVALSHA command to the node of its keys
    (`route`): one round trip per node, each call's keys in one slot.
    """
    results: list = [None] * len(calls)
    pending = list(range(len(calls)))
    for attempt in range(2):
        with client.pipeline(transaction=False) as pipe:
            for i in pending:
                keys, args = calls[i]
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args,
                                     **route(client, keys[0]))
            answers = pipe.execute(raise_on_error=False)
        retry = []
        for i, answer in zip(pending, answers):
            if isinstance(answer, NoScriptError) and attempt == 0:
                retry.append(i)
            elif isinstance(answer, Exception):
                raise answer
            else:
                results[i] = answer
        if not retry:
            break
        script.sha = client.script_load(script.script)
        pending = retry
    return results


def wait_for_replicas(client: Client, where: str, touches: list[tuple[str, str, str]],
                      replicas: int, timeout_ms: int) -> None:
    """Returns once every write made so far on each server holding a key in `touches` has
    reached `replicas` of its replicas (WAIT); NotReady naming the server when it has not
    within `timeout_ms`.

    WAIT covers the writes of its own connection only, and a pipeline (a cluster's above all,
    which re-sends a redirected command on another connection) may have used any. So each
    server gets, on one connection, an idempotent write chosen by the caller (HSET key field
    value, on a key the call wrote, value unchanged) and then WAIT: that write comes after
    every earlier write on the server, so its replication covers them, the call's own and
    the earlier write that a duplicate stands for."""
    servers: dict[str, tuple[redis.Redis, tuple[str, str, str]]] = {}
    for touch in touches:
        if isinstance(client, redis.RedisCluster):
            node = client.get_node_from_key(touch[0])
            servers.setdefault(node.name, (client.get_redis_connection(node), touch))
        else:
            servers.setdefault(where, (client, touch))
    for name, (server, (key, field, value)) in servers.items():
        with server.pipeline(transaction=False) as pipe:
            pipe.hset(key, field, value)
            pipe.wait(replicas, timeout_ms)
            _, reached = pipe.execute()
        if reached < replicas:
            named = where if name in where else f"{where}, node {name}"
            raise NotReady(f"redis at {named}: the write reached {reached} of {replicas} "
                           f"replicas within {timeout_ms} ms; it is stored on the primary and "
                           "may still replicate, re-sending it is safe")

