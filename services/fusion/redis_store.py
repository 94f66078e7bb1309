"""Redis backend of the profile store: one Lua script per user write, on one server or a Redis
Cluster (`redis+cluster://` URL, see services/common/redisio.py).

Durability: the store relies on every server running with `appendonly yes` and
`appendfsync always`. Redis then writes and fsyncs the append-only file before it sends the
reply of a write (the reply waits in the client's output buffer until the fsync is done), so
a write is on disk when its call returns. The constructor checks both settings with
CONFIG GET (on every node the cluster client knows) and refuses to start otherwise unless
`require_fsync=False` (for servers where CONFIG is disabled but known to fsync every write).
Replication is asynchronous: a failover to a replica that had not yet received a write loses
it, acknowledged or not. With `replica_acks` = N an append returns only once its writes
reached N replicas of every primary holding them (WAIT, see redisio.wait_for_replicas), so a
failover to one of those replicas keeps them; otherwise NotReady (the write is on the primary
and may still replicate; re-sending is safe).

Key layout (`<prefix>` defaults to "crossrec"; `<uh>` = blake2b-128 hex of the UTF-8 user id,
so a user id holding `{` or `}` cannot change the hash tag; every key of one user lands in
one cluster slot, so every script and each user's part of a pipeline runs on one node):

    <prefix>:{u:<uh>}:events           HASH  event id -> content digest, every event ever
                                             stored (dedupe and conflicts)
    <prefix>:{u:<uh>}:ids              SET   event ids stored before digests were kept
                                             (read, never written: duplicates, no conflicts)
    <prefix>:{u:<uh>}:stats            HASH  n:<platform> all-time count,
                                             t:<platform> last-seen event_time_ms,
                                             user the user id as stored (the caller's, or
                                             its keyed hash with --user-id-key-file)
    <prefix>:{u:<uh>}:platforms        SET   platforms with a recent key (no SCAN needed)
    <prefix>:{u:<uh>}:recent:<platform> ZSET newest RECENT_PER_PLATFORM events;
                                             score event_time_ms, member event_id NUL json
    <prefix>:item:{<platform>:<item_id>} HASH text, vec (float32 bytes, native order)

Members start with the event id followed by NUL (below every printable byte), so ties on
time are ordered by event id bytes, exactly as SQLite orders (event_time_ms, event_id).

Budgets: every store method takes `timeout_s` and runs its commands under
`services.common.redisio.deadline`: nothing waits past it, no retry runs past it, a
connection cut short is closed, and the store answers BudgetSpent naming the server.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from contextlib import contextmanager

import numpy as np

from recmodel.events import Event
from services.common import redisio
from services.common.errors import BudgetSpent, NotReady
from services.common.validation import check_platform, event_digest
from services.common.redisio import as_text
from services.fusion.store import RECENT_PER_PLATFORM, PlatformHistory, ProfileStore

_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# History and delete pass the user's platforms as KEYS; a platform added between reading the
# set and running the script makes the script refuse, and the call re-reads. Platforms are few
# and rarely new, so a handful of tries is plenty.
_MAX_PLATFORM_RACES = 8

# KEYS: ids, stats, platforms, events, recent:<p1>..recent:<pP>.
# ARGV: keep, user_id, P, p1..pP, then per event: platform index (1..P), event_id, time_ms,
# member, digest. Returns {positions (0-based) of the events accepted (in neither ids nor
# events), number of duplicates whose digest differs from the stored one}.
_APPEND_LUA = """
local keep = tonumber(ARGV[1])
local n_platforms = tonumber(ARGV[3])
local first = 4 + n_platforms
local touched = {}
local accepted = 0
local new = {}
local conflicts = 0
for i = first, #ARGV, 5 do
  local p = tonumber(ARGV[i])
  local fresh = false
  if redis.call('SISMEMBER', KEYS[1], ARGV[i + 1]) == 0 then
    if redis.call('HSETNX', KEYS[4], ARGV[i + 1], ARGV[i + 4]) == 1 then
      fresh = true
    elseif redis.call('HGET', KEYS[4], ARGV[i + 1]) ~= ARGV[i + 4] then
      conflicts = conflicts + 1
    end
  end
  if fresh then
    local platform = ARGV[3 + p]
    local time_ms = ARGV[i + 2]
    redis.call('ZADD', KEYS[4 + p], time_ms, ARGV[i + 3])
    redis.call('HINCRBY', KEYS[2], 'n:' .. platform, 1)
    local last = redis.call('HGET', KEYS[2], 't:' .. platform)
    if (not last) or tonumber(last) < tonumber(time_ms) then
      redis.call('HSET', KEYS[2], 't:' .. platform, time_ms)
    end
    touched[p] = true
    accepted = accepted + 1
    new[accepted] = (i - first) / 5
  end
end
if accepted > 0 then
  redis.call('HSET', KEYS[2], 'user', ARGV[2])
end
for p = 1, n_platforms do
  if touched[p] then
    redis.call('SADD', KEYS[3], ARGV[3 + p])
    redis.call('ZREMRANGEBYRANK', KEYS[4 + p], 0, -keep - 1)
  end
end
return {new, conflicts}
"""

# Shared prologue of history and delete: KEYS as above with the platforms the caller read;
# ARGV those platform names. -1 when the stored set has a platform the caller did not declare.
_CHECK_PLATFORMS_LUA = """
local declared = {}
for i = 1, #ARGV do declared[ARGV[i]] = true end
for _, platform in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if not declared[platform] then return -1 end
end
"""

# Returns {stats as HGETALL, members of recent:<p1>, ..., members of recent:<pP>}.
_HISTORY_LUA = _CHECK_PLATFORMS_LUA + """
local out = {redis.call('HGETALL', KEYS[2])}
for i = 5, #KEYS do
  out[#out + 1] = redis.call('ZRANGE', KEYS[i], 0, -1)
end
return out
"""

# Returns the user's all-time event count (sum of n:<platform>) and deletes every key.
_DELETE_LUA = _CHECK_PLATFORMS_LUA + """
local stats = redis.call('HGETALL', KEYS[2])
local total = 0
for i = 1, #stats, 2 do
  if string.sub(stats[i], 1, 2) == 'n:' then total = total + tonumber(stats[i + 1]) end
end
redis.call('DEL', unpack(KEYS))
return total
"""


def _encode_member(e: Event) -> bytes:
    payload = json.dumps([e.event_time_ms, e.action, e.weight, e.item_id],
                         separators=(",", ":"), ensure_ascii=False)
    return e.event_id.encode() + b"\x00" + payload.encode()


def _decode_member(member: bytes, user_id: str, platform: str) -> Event:
    # rpartition: the JSON tail never holds a raw NUL, so any NUL before it is the event id's.
    event_id, _, payload = member.rpartition(b"\x00")
    time_ms, action, weight, item_id = json.loads(payload)
    return Event(event_id.decode(), user_id, platform, int(action), item_id, "", int(time_ms),
                 float(weight))


class RedisProfileStore(ProfileStore):
    """Profile store on one Redis primary or a Redis Cluster (see the module docstring for
    durability and keys). On a cluster, a batch's users spread over the primaries, one round
    trip per node; while one primary is down, the calls that touch its users answer NotReady
    (the other users' events of such a batch are stored: re-send it).

    Per-user writes run as one Lua script, so each user's part of a batch is atomic; a batch
    spanning users is one script call per user, pipelined in one round trip but not one
    transaction: if Redis fails midway, some users' events may be stored and others not.
    Re-sending the batch is safe (dedupe), though the retried call then counts the events
    stored by the failed attempt as duplicates. The same holds for redis-py's own retry after
    a connection error or a timeout, and for a write cut short by its budget.

    Every method takes `timeout_s`: the call's budget in seconds (None: only
    `socket_timeout_s` per read, retried twice). Within a budget, redis-py still retries a
    refused or reset connection, but nothing waits past the budget.

    Errors: NotReady when Redis is unreachable, times out, is loading, read-only or cannot
    write its AOF (message "redis at HOST:PORT ..."), or when the store is closed; BudgetSpent
    when Redis does not answer within `timeout_s` ("redis at HOST:PORT did not answer ...");
    Overloaded when all `max_connections` connections are busy (per node on a cluster);
    NotReady when `replica_acks` replicas did not confirm within `replica_ack_timeout_ms`.
    """

    backend = "RedisStore"  # the metric label it had before the class was renamed

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "crossrec",
                 require_fsync: bool = True, connect_timeout_s: float = 2.0,
                 socket_timeout_s: float = 5.0, max_connections: int = 64,
                 replica_acks: int = 0, replica_ack_timeout_ms: int = 1000):
        if not _PREFIX_PATTERN.match(prefix):
            raise ValueError(f"prefix must match {_PREFIX_PATTERN.pattern}, got {prefix!r}")
        if replica_acks < 0 or replica_ack_timeout_ms <= 0:
            raise ValueError(f"replica_acks must be >= 0 and replica_ack_timeout_ms > 0, got "
                             f"{replica_acks} and {replica_ack_timeout_ms}")
        self.prefix = prefix
        self.replica_acks, self.replica_ack_timeout_ms = replica_acks, replica_ack_timeout_ms
        self._max_connections = max_connections
        self._closed = False
        self._client = redisio.client(url, connect_timeout_s=connect_timeout_s,
                                      socket_timeout_s=socket_timeout_s,
                                      max_connections=max_connections)
        self.where = redisio.address(self._client)
        self._append_script = self._client.register_script(_APPEND_LUA)
        self._history_script = self._client.register_script(_HISTORY_LUA)
        self._delete_script = self._client.register_script(_DELETE_LUA)
        try:
            with self._errors():
                self._client.ping()
                if require_fsync:
                    redisio.check_fsync(self._client, self.where, "events")
                redisio.load_scripts(self._client, self._append_script, self._history_script,
                                     self._delete_script)
        except BaseException:
            self._client.close()
            raise

    @contextmanager
    def _errors(self, timeout_s: float | None = None, writes: bool = False):
        """Runs the block under the deadline `timeout_s` from now and maps redis errors."""
        if self._closed:
            raise NotReady("profile store is closed")
        if timeout_s is not None and timeout_s <= 0:
            raise BudgetSpent(f"redis at {self.where} not asked: the call's budget was spent")
        note = ("; the write may still be applied: re-sending it is safe (event ids dedupe)"
                if writes else "")
        with redisio.errors(self.where, self._max_connections, timeout_s, note):
            yield

    # --- keys -----------------------------------------------------------------------------
    def _user_keys(self, user_id: str) -> tuple[str, str, str, str]:
        """The user's (ids, stats, platforms, events) keys, KEYS[1..4] of every script;
        _recent_key derives the per-platform ones."""
        tag = hashlib.blake2b(user_id.encode(), digest_size=16).hexdigest()
        base = f"{self.prefix}:{{u:{tag}}}:"
        return base + "ids", base + "stats", base + "platforms", base + "events"

    @staticmethod
    def _recent_key(stats_key: str, platform: str) -> str:
        return stats_key[:-len("stats")] + "recent:" + platform

    def _item_key(self, platform: str, item_id: str) -> str:
        # The platform pattern has no ':', which keeps (platform, item_id) -> key one-to-one.
        check_platform(platform)
        return f"{self.prefix}:item:{{{platform}:{item_id}}}"

    # --- writes ---------------------------------------------------------------------------
    def append(self, events: list[Event], timeout_s: float | None = None
               ) -> tuple[int, int, int]:
        """Store `events`; (accepted, duplicates, conflicts) once fsynced. Atomic per user.

        BudgetSpent after `timeout_s`: nothing is acknowledged, though Redis may still apply
        the write; re-sending the batch is safe (ids dedupe).
        """
        by_user: dict[str, list[Event]] = defaultdict(list)
        for e in events:
            by_user[e.user_id].append(e)
        users = list(by_user.items())
        calls = [self._append_call(user, user_events) for user, user_events in users]
        with self._errors(timeout_s, writes=True):
            results = redisio.pipeline_scripts(self._client, self._append_script, calls)
            new = [user_events[int(i)] for (_, user_events), (positions, _) in
                   zip(users, results) for i in positions]
            self._count_items(new)
            if self.replica_acks:
                # Duplicates too: the earlier write that stored them may not have replicated.
                redisio.wait_for_replicas(
                    self._client, self.where,
                    [(self._user_keys(user)[1], "user", user) for user, _ in users],
                    self.replica_acks, self.replica_ack_timeout_ms)
        conflicts = sum(int(n) for _, n in results)
        return len(new), len(events) - len(new), conflicts

    def _count_items(self, events: list[Event]) -> None:
        """Per-item popularity, one sorted set per platform. Written after the events, not
        atomically with them: a crash in between undercounts popularity, never loses events."""
        if not events:
            return
        # Summed per item first: a command per distinct item (and one ZADD per platform),
        # not two per event; a cluster pipeline routes each command in Python.
        counts: dict[tuple[str, str], int] = defaultdict(int)
        last: dict[str, dict[str, int]] = defaultdict(dict)
        for e in events:
            counts[e.platform, e.item_id] += 1
            seen = last[e.platform]
            seen[e.item_id] = max(seen.get(e.item_id, e.event_time_ms), e.event_time_ms)
        with self._client.pipeline(transaction=False) as pipe:
            for (platform, item_id), count in counts.items():
                pipe.zincrby(self._pop_key(platform), count, item_id)
            for platform, times in last.items():
                pipe.zadd(self._last_key(platform), times, gt=True)
            pipe.execute()

    def _pop_key(self, platform: str) -> str:
        return f"{self.prefix}:popularity:{{{platform}}}"

    def _last_key(self, platform: str) -> str:
        return f"{self.prefix}:last_event:{{{platform}}}"

    def item_stats(self, platform: str, limit: int,
                   timeout_s: float | None = None) -> list[tuple[str, int, int]]:
        """(item_id, event count, last event ms) of the `limit` items with most events."""
        with self._errors(timeout_s):
            top = self._client.zrevrange(self._pop_key(platform), 0, limit - 1, withscores=True)
            if not top:
                return []
            last = self._client.zmscore(self._last_key(platform), [i for i, _ in top])
        return [(as_text(i), int(c), int(t or 0)) for (i, c), t in zip(top, last)]

    def _append_call(self, user_id: str, events: list[Event]) -> tuple[list, list]:
        ids, stats, platforms, known = self._user_keys(user_id)
        names = list(dict.fromkeys(e.platform for e in events))
        index = {name: i for i, name in enumerate(names, start=1)}
        keys = [ids, stats, platforms, known, *(self._recent_key(stats, p) for p in names)]
        args: list = [RECENT_PER_PLATFORM, user_id, len(names), *names]
        for e in events:
            args += [index[e.platform], e.event_id, int(e.event_time_ms), _encode_member(e),
                     event_digest(e)]
        return keys, args

    def delete_user(self, user_id: str, timeout_s: float | None = None) -> int:
        """Remove every key of the user; the user's all-time event count (0: unknown)."""
        with self._errors(timeout_s, writes=True):
            _, count = self._per_user_script(self._delete_script, user_id)
        return int(count)

    def put_items(self, items: dict[tuple[str, str], tuple[str, np.ndarray]],
                  timeout_s: float | None = None) -> None:
        """Cache (text, vector) per (platform, item_id); vectors stored as float32 bytes.

        InvalidInput for a platform outside events.PLATFORM_PATTERN (item keys rely on it).
        """
        if not items:
            return
        keyed = [(self._item_key(*key), text, np.asarray(vec, np.float32).tobytes())
                 for key, (text, vec) in items.items()]
        with self._errors(timeout_s, writes=True), \
                self._client.pipeline(transaction=False) as pipe:
            for key, text, blob in keyed:
                pipe.hset(key, mapping={"text": text, "vec": blob})
            pipe.execute()

    # --- reads ----------------------------------------------------------------------------
    def _per_user_script(self, script, user_id: str):
        """(platforms, answer) of a history/delete script run with every key of the user
        declared in KEYS, so that it stays within one cluster slot."""
        ids, stats, platforms_key, known = self._user_keys(user_id)
        for _ in range(_MAX_PLATFORM_RACES):
            names = sorted(as_text(p) for p in self._client.smembers(platforms_key))
            keys = [ids, stats, platforms_key, known,
                    *(self._recent_key(stats, p) for p in names)]
            answer = script(keys=keys, args=names)
            if answer != -1:
                return names, answer
        raise NotReady(f"redis at {self.where}: platforms of a user kept changing during "
                       f"{_MAX_PLATFORM_RACES} tries; retry")

    def history(self, user_id: str, timeout_s: float | None = None
                ) -> dict[str, PlatformHistory]:
        """Per platform: newest events oldest first (texts empty), count, last seen (ms)."""
        with self._errors(timeout_s):
            names, (stats, *recent) = self._per_user_script(self._history_script, user_id)
        fields = {as_text(stats[i]): stats[i + 1] for i in range(0, len(stats), 2)}
        out: dict[str, PlatformHistory] = {}
        for field, value in fields.items():
            if field.startswith("n:"):
                platform = field[2:]
                out[platform] = PlatformHistory([], int(value),
                                                int(fields.get("t:" + platform, 0)))
        for platform, members in zip(names, recent):
            if members:
                events = [_decode_member(m, user_id, platform) for m in members]
                out.setdefault(platform, PlatformHistory()).events.extend(events)
        return out

    def get_items(self, keys: list[tuple[str, str]], timeout_s: float | None = None
                  ) -> dict[tuple[str, str], tuple[str, np.ndarray]]:
        """Cached (text, read-only float32 vector of shape (dim,)) for the cached keys.

        InvalidInput for a platform outside events.PLATFORM_PATTERN.
        """
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        redis_keys = [self._item_key(*key) for key in unique]
        with self._errors(timeout_s), self._client.pipeline(transaction=False) as pipe:
            for key in redis_keys:
                pipe.hmget(key, ["text", "vec"])
            answers = pipe.execute()
        return {key: (text.decode(), np.frombuffer(blob, dtype=np.float32))
                for key, (text, blob) in zip(unique, answers)
                if text is not None and blob is not None}

    def close(self) -> None:
        """Release the connections; later calls raise NotReady. Nothing to flush: every
        acknowledged write is already fsynced by the server."""
        if self._closed:
            return
        self._closed = True
        self._client.close()
