"""Item catalogue shared by every ranking replica, on Redis: items and vectors durable there,
and a change log each replica tails to keep its in-memory indexes in step.

Keys (`<prefix>` defaults to "crossrec"; one hash tag puts them in one cluster slot, so one
Lua script can write them all, and the log is one stream read in order). On a Redis Cluster
(`redis+cluster://`) the whole catalogue therefore lives on one primary (and its replicas):
the cluster gives it failover, not more room or write throughput than one node. That fits
its size (a million 384-d items is about 1.6 GB); spreading it would need a log per slot
and an order across logs.

    <prefix>:{catalog}:platforms         SET     platforms that ever held an item
    <prefix>:{catalog}:meta:<platform>   HASH    item_id -> JSON [title, attributes, text]
    <prefix>:{catalog}:vec:<platform>    HASH    item_id -> float32 vector bytes (native order)
    <prefix>:{catalog}:order:<platform>  HASH    item_id -> its last write's number (below)
    <prefix>:{catalog}:written           STRING  writes numbered so far (INCR per item)
    <prefix>:{catalog}:log               STREAM  one entry per upsert or delete call:
                                                 op (upsert|delete), items JSON [[platform, id]...]

Writes: one Lua script stores the items (or deletes them) and appends the log entry,
atomically. Redis must run with `appendonly yes` and `appendfsync always` (checked at start,
as fusion's store does), so the script's reply means both are on disk: an upsert is
acknowledged only once durable.

Reads: every replica holds the whole catalogue in memory (MemoryCatalog), as the SQLite
catalogue does. At start it notes the log's last id, loads every item, then one thread tails
the log from that id (XREAD BLOCK, so it wakes as an entry lands). For each batch of entries
it re-reads the named items' current values and applies them (absent: deleted). Applying
current values, not the entries' contents, makes a replay harmless and order-safe, and that
thread is the only writer of the in-memory state, in log order. Rows are held in the order
the writes were made (each item's number in `order:<platform>`), on load as when tailing, so
every replica, like the offline evaluation of the same catalogue, holds the same rows in the
same order: ties between items, and the float sums of the scans, then agree bit for bit
(sqlite_catalog.py). upsert and delete return once this replica's thread has applied their
own entry: the replica that took a write serves it at once, the others within their tail
latency (services/ranking/README.md: staleness).

The log is capped near `log_max_entries` (XADD MAXLEN ~). Each replica counts the entries it
has reflected (the log's `entries-added` at its load, plus every entry it applied since).
Before each read the tail asks XINFO STREAM where the log stands: if more entries were trimmed
than it has reflected (it fell further behind than the cap) or fewer were ever added (Redis
lost the log), it reloads the whole catalogue instead of tailing. (`entries-added` needs
Redis >= 7; on older servers this check is skipped.)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager

import numpy as np
import redis

from services.common import metrics, redisio
from services.common.redisio import as_text
from services.common.errors import BudgetSpent, NotReady
from services.ranking.catalog import Catalog, CatalogItem, MemoryCatalog, Row

log = logging.getLogger("crossrec.ranking")

# KEYS: platforms, log, written, then meta:<p>, vec:<p>, order:<p> per platform. ARGV: log
# cap, items JSON, P, p1..pP, then per item: platform index (1..P), item_id, meta JSON,
# vector bytes.
_UPSERT_LUA = """
local n = tonumber(ARGV[3])
for p = 1, n do redis.call('SADD', KEYS[1], ARGV[3 + p]) end
for i = 4 + n, #ARGV, 4 do
  local p = tonumber(ARGV[i])
  redis.call('HSET', KEYS[1 + 3 * p], ARGV[i + 1], ARGV[i + 2])
  redis.call('HSET', KEYS[2 + 3 * p], ARGV[i + 1], ARGV[i + 3])
  redis.call('HSET', KEYS[3 + 3 * p], ARGV[i + 1], redis.call('INCR', KEYS[3]))
end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'op', 'upsert',
                  'items', ARGV[2])
"""

# KEYS: log, meta:<p>, vec:<p>, order:<p>. ARGV: log cap, items JSON, item ids. Returns
# {number that existed, log entry id or '' when none did}.
_DELETE_LUA = """
local gone = 0
for i = 3, #ARGV do
  gone = gone + redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i])
end
if gone == 0 then return {0, ''} end
return {gone, redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'op', 'delete',
                         'items', ARGV[2])}
"""

_NO_ENTRY = "0-0"
_LOAD_CHUNK = 1000


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _in_write_order(items: list[tuple], order: list) -> list[tuple]:
    """The (item_id, meta, vector) tuples still stored (meta and vector present), sorted by
    their write numbers `order` (from the order hash; an item written before it existed has
    none and comes first, by id): every replica holds its rows in one order, the order
    writes were made, as the SQLite catalogue does (sqlite_catalog.py)."""
    kept = [(-1 if n is None else int(n), as_text(t[0]), t) for t, n in zip(items, order)
            if t[1] is not None and t[2] is not None]
    kept.sort(key=lambda k: k[:2])
    return [t for *_, t in kept]


class RedisCatalog(MemoryCatalog, Catalog):
    """Catalogue on one Redis primary (or one slot of a Redis Cluster) shared by every replica
    (see the module docstring).

    Same methods as `SQLiteCatalog` (the `Catalog` interface). Errors: NotReady when Redis
    is unreachable, refuses the write, lacks fsync on every write (at start), or when this
    replica has not applied a stored write within `apply_wait_s` (it is durable; it shows
    once the tail catches up); Overloaded when all `max_connections` connections are busy.
    `tail_block_s` is how long one XREAD waits for entries before it checks for close().
    """

    def __init__(self, url: str, dim: int, index: str = "auto", hnsw_threshold: int = 200_000,
                 *, prefix: str = "crossrec", require_fsync: bool = True,
                 connect_timeout_s: float = 2.0, socket_timeout_s: float = 5.0,
                 max_connections: int = 16, log_max_entries: int = 10_000,
                 apply_wait_s: float = 5.0, tail_block_s: float = 0.5,
                 projection: np.ndarray | None = None):
        super().__init__(dim, index, hnsw_threshold, projection)
        base = f"{prefix}:{{catalog}}:"
        self._platforms_key, self._log_key = base + "platforms", base + "log"
        self._meta_prefix, self._vec_prefix = base + "meta:", base + "vec:"
        self._order_prefix, self._written_key = base + "order:", base + "written"
        self._max_connections = max_connections
        self.log_max_entries, self.apply_wait_s = log_max_entries, apply_wait_s
        self._tail_block_ms = int(tail_block_s * 1000)
        self._client = redisio.client(url, connect_timeout_s=connect_timeout_s,
                                      socket_timeout_s=socket_timeout_s,
                                      max_connections=max_connections)
        self.where = redisio.address(self._client)
        # The tail blocks in XREAD for up to tail_block_s: a connection of its own, whose
        # socket timeout outlasts the block.
        self._tail_client = redisio.client(url, connect_timeout_s=connect_timeout_s,
                                           socket_timeout_s=tail_block_s + socket_timeout_s,
                                           max_connections=1)
        self._upsert_script = self._client.register_script(_UPSERT_LUA)
        self._delete_script = self._client.register_script(_DELETE_LUA)
        self._applied = _NO_ENTRY  # last log entry reflected in memory
        self._reflected = 0  # log entries reflected in memory, counted from the log's start
        self._applied_changed = threading.Condition()
        self._stop = threading.Event()
        self._tail_error = ""
        try:
            with self._errors():
                self._client.ping()
                if require_fsync:
                    redisio.check_fsync(self._client, self.where, "items")
                redisio.load_scripts(self._client, self._upsert_script, self._delete_script)
                self._reload()
        except BaseException:
            self._disconnect()
            raise
        self._tail = threading.Thread(target=self._tail_loop, name="catalog-tail", daemon=True)
        self._tail.start()

    # --- writes ---------------------------------------------------------------------------
    def upsert(self, items: list[CatalogItem], vectors: np.ndarray,
               timeout_s: float | None = None) -> None:
        """Store items with float32 [n, dim] vectors durably (fsynced by Redis), then wait
        until this replica serves them; every other replica follows through the log. Within
        `timeout_s` (None: the pool's socket timeouts), else BudgetSpent."""
        if not items:
            return
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        vectors = np.asarray(vectors, np.float32)
        names = list(dict.fromkeys(it.platform for it in items))
        slot = {name: n for n, name in enumerate(names, start=1)}
        keys = [self._platforms_key, self._log_key, self._written_key]
        for name in names:
            keys += [self._meta_prefix + name, self._vec_prefix + name,
                     self._order_prefix + name]
        args: list = [self.log_max_entries,
                      json.dumps([[it.platform, it.item_id] for it in items]), len(names), *names]
        for it, vec in zip(items, vectors):
            args += [slot[it.platform], it.item_id,
                     json.dumps([it.title, it.attributes, it.text]), vec.tobytes()]
        with self._errors(timeout_s, writes=True):
            entry = as_text(self._upsert_script(keys=keys, args=args))
        self._wait_applied(entry, deadline)

    def delete(self, platform: str, item_ids: list[str], timeout_s: float | None = None) -> int:
        """Remove items everywhere; the number that existed. Returns once this replica no
        longer serves them. Within `timeout_s` (see upsert)."""
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return 0
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._errors(timeout_s, writes=True):
            gone, entry = self._delete_script(
                keys=[self._log_key, self._meta_prefix + platform, self._vec_prefix + platform,
                      self._order_prefix + platform],
                args=[self.log_max_entries, json.dumps([[platform, i] for i in ids]), *ids])
        if gone:
            self._wait_applied(as_text(entry), deadline)
        return int(gone)

    def _wait_applied(self, entry: str, call_deadline: float | None = None) -> None:
        wanted = _entry_key(entry)
        deadline = time.monotonic() + self.apply_wait_s
        with self._applied_changed:
            while _entry_key(self._applied) < wanted:
                now = time.monotonic()
                if call_deadline is not None and now >= call_deadline:
                    raise BudgetSpent(
                        f"stored in redis at {self.where} (log entry {entry}), but this replica "
                        "did not apply it within the call's budget; every replica will")
                left = min(deadline, call_deadline or deadline) - now
                if deadline - now <= 0 or self._stop.is_set():
                    raise NotReady(
                        f"stored in redis at {self.where} (log entry {entry}), but this replica "
                        f"has not applied it within {self.apply_wait_s:.1f} s; it will once its "
                        f"catalogue log tail catches up ({self._tail_error or 'no error'})")
                self._applied_changed.wait(left)

    # --- the log tail ---------------------------------------------------------------------
    def _tail_loop(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                with self._errors():
                    # Before every read, one cheap XINFO: XREAD from a trimmed position
                    # silently starts at the oldest entry left.
                    self._check_position()
                    answer = self._tail_client.xread({self._log_key: self._applied},
                                                     count=_LOAD_CHUNK,
                                                     block=self._tail_block_ms)
                    if answer:
                        self._apply_entries(answer[0][1])
                if self._tail_error:
                    log.info("catalogue log tail resumed", extra={"fields": {
                        "redis": self.where}})
                self._tail_error, delay = "", 0.1
            except Exception as err:  # noqa: BLE001 - the tail must outlive any failure
                if not self._tail_error:
                    log.warning("catalogue log tail failed; serving the last state, retrying",
                                extra={"fields": {"redis": self.where, "error": str(err)}})
                self._tail_error = str(err)
                self._stop.wait(delay)
                delay = min(delay * 2, 1.0)

    def _apply_entries(self, entries: list) -> None:
        """Apply the current value of every item the entries name, then mark them applied."""
        touched: dict[str, list[str]] = {}
        for _, fields in entries:
            for platform, item_id in json.loads(fields[b"items"]):
                touched.setdefault(platform, []).append(item_id)
        touched = {p: list(dict.fromkeys(ids)) for p, ids in touched.items()}
        with self._client.pipeline(transaction=False) as pipe:
            for platform, ids in touched.items():
                pipe.hmget(self._meta_prefix + platform, ids)
                pipe.hmget(self._vec_prefix + platform, ids)
                pipe.hmget(self._order_prefix + platform, ids)
            answers = pipe.execute()
        for n, (platform, ids) in enumerate(touched.items()):
            metas, vecs, order = answers[3 * n], answers[3 * n + 1], answers[3 * n + 2]
            present = _in_write_order([(i, m, v) for i, m, v in zip(ids, metas, vecs)], order)
            wrong = [i for i, _, v in present if len(v) != 4 * self.dim]
            if wrong:
                log.error("catalogue vectors of the wrong dimension skipped", extra={"fields": {
                    "platform": platform, "items": len(wrong), "dim": self.dim}})
                present = [p for p in present if len(p[2]) == 4 * self.dim]
            items = []
            for item_id, meta, _ in present:
                title, attributes, text = json.loads(meta)
                items.append(CatalogItem(item_id, platform, title, attributes, text))
            if items:
                self._apply_upsert(items, np.frombuffer(b"".join(v for *_, v in present),
                                                        np.float32).reshape(len(items), self.dim))
            kept = {i for i, *_ in present}
            self._apply_delete(platform, [i for i in ids if i not in kept])
            metrics.CATALOG_ITEMS.labels(platform).set(self.size(platform))
        self._mark_applied(as_text(entries[-1][0]), self._reflected + len(entries))

    def _mark_applied(self, entry: str, reflected: int) -> None:
        with self._applied_changed:
            self._applied, self._reflected = entry, reflected
            self._applied_changed.notify_all()

    def _log_info(self) -> tuple[str, int | None, int]:
        """(last entry id, entries ever added (None before Redis 7), entries kept) of the
        log, read at one instant; ("0-0", 0, 0) when there is no log."""
        try:
            info = self._client.xinfo_stream(self._log_key)
        except redis.ResponseError:  # no such key: nothing written yet, or the data was lost
            return _NO_ENTRY, 0, 0
        info = {as_text(k): v for k, v in info.items()}
        added = info.get("entries-added")
        return (as_text(info["last-generated-id"]), None if added is None else int(added),
                int(info["length"]))

    def _check_position(self) -> None:
        """Reload everything when log entries this replica has not reflected are gone."""
        _, added, length = self._log_info()
        if added is None:
            return
        if added - length > self._reflected or added < self._reflected:
            log.warning("catalogue log no longer holds what this replica missed; reloading",
                        extra={"fields": {"redis": self.where, "reflected": self._reflected,
                                          "added": added, "kept": length}})
            self._reload()

    # --- full load ------------------------------------------------------------------------
    def _reload(self) -> None:
        """Note the log position, then read every item (HSCAN, chunked) and hold them in
        write order; the tail replays what changed meanwhile."""
        position, added, _ = self._log_info()
        rows: dict[str, list[Row]] = {}
        for platform in sorted(as_text(p) for p in self._client.smembers(self._platforms_key)):
            meta_key, vec_key = self._meta_prefix + platform, self._vec_prefix + platform
            order_key = self._order_prefix + platform
            cursor, found = 0, []
            while True:
                cursor, chunk = self._client.hscan(meta_key, cursor, count=_LOAD_CHUNK)
                ids = list(chunk)
                if ids:
                    found += zip(ids, chunk.values(), self._client.hmget(vec_key, ids),
                                 self._client.hmget(order_key, ids))
                if cursor == 0:
                    break
            # An item deleted meanwhile (no vector) is left out; the log says so too.
            for item_id, meta, blob in _in_write_order([f[:3] for f in found],
                                                       [f[3] for f in found]):
                if len(blob) != 4 * self.dim:
                    raise NotReady(
                        f"catalogue in redis at {self.where} holds {platform} vectors of "
                        f"dimension {len(blob) // 4}, the embedding model has {self.dim}: "
                        "re-upsert the catalogue or use another prefix")
                title, attributes, text = json.loads(meta)
                rows.setdefault(platform, []).append(
                    (as_text(item_id), title, json.dumps(attributes), text, blob))
        self._replace_all(rows)
        for platform in rows:
            metrics.CATALOG_ITEMS.labels(platform).set(self.size(platform))
        self._mark_applied(position, added or 0)

    # --- plumbing -------------------------------------------------------------------------
    @contextmanager
    def _errors(self, timeout_s: float | None = None, writes: bool = False):
        if self._stop.is_set():
            raise NotReady("catalogue is closed")
        note = "; the write may still be applied: re-sending it is safe" if writes else ""
        with redisio.errors(self.where, self._max_connections, timeout_s, note):
            yield

    def _disconnect(self) -> None:
        self._client.close()
        self._tail_client.close()

    def close(self) -> None:
        """Stop the tail and release the connections. Nothing to flush: every acknowledged
        write is already fsynced by Redis."""
        self._stop.set()
        if getattr(self, "_tail", None) is not None:
            self._tail.join(self._tail_block_ms / 1000 + 10)
        with self._applied_changed:
            self._applied_changed.notify_all()
        self._disconnect()
