"""SQLite profile store (the embedded default): one file in WAL mode, one writer thread that
group-commits, readers on their own connections; what it keeps is store.py's.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections import defaultdict
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from recmodel.events import Event
from services.common.errors import BudgetSpent, NotReady, Overloaded
from services.common.validation import event_digest
from services.fusion.store import RECENT_PER_PLATFORM, PlatformHistory, ProfileStore

log = logging.getLogger("crossrec.fusion")

# After a commit that deleted a user, the WAL is checkpointed into the database and truncated
# (the deleted rows' old page images live in it until then). The checkpoint waits at most
# this long for readers still on an older snapshot; if they hold it off, it is retried every
# DELETE_CHECKPOINT_RETRY_S until done. services/fusion/README.md states the bound.
DELETE_CHECKPOINT_WAIT_MS = 1000
DELETE_CHECKPOINT_RETRY_S = 1.0
BUSY_TIMEOUT_MS = 30000


class SQLiteProfileStore(ProfileStore):
    """SQLite in WAL mode with synchronous=FULL: a commit is on disk when it returns.

    One writer thread commits every batch queued meanwhile in one transaction (group commit),
    then acknowledges them; readers use their own connections and see every committed batch.
    Writes wait for their commit at most `timeout_s`; reads take it for interface parity only:
    in WAL mode they never wait on the writer, and a local file does not hang like a server.

    Deleted data: every connection runs with secure_delete=ON, so SQLite overwrites deleted
    rows and freed pages with zeros (whatever the build's default), and a commit that deleted
    a user is followed by a checkpoint that copies the WAL into the database and truncates it
    (bounded: DELETE_CHECKPOINT_WAIT_MS, retried); a delete is acknowledged after that
    checkpoint (or its first try).
    """

    backend = "SQLiteStore"  # the metric label it had before the class was renamed

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS event_ids (
        user_id TEXT NOT NULL, event_id TEXT NOT NULL, digest TEXT,
        PRIMARY KEY (user_id, event_id)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS recent (
        user_id TEXT NOT NULL, platform TEXT NOT NULL, event_time_ms INTEGER NOT NULL,
        event_id TEXT NOT NULL, action INTEGER NOT NULL, item_id TEXT NOT NULL,
        weight REAL NOT NULL, PRIMARY KEY (user_id, platform, event_time_ms, event_id)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS stats (
        user_id TEXT NOT NULL, platform TEXT NOT NULL, count INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL, PRIMARY KEY (user_id, platform)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS item_stats (
        platform TEXT NOT NULL, item_id TEXT NOT NULL, count INTEGER NOT NULL,
        last_event_ms INTEGER NOT NULL, PRIMARY KEY (platform, item_id)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS item_stats_by_count ON item_stats (platform, count DESC);
    CREATE TABLE IF NOT EXISTS items (
        platform TEXT NOT NULL, item_id TEXT NOT NULL, text TEXT NOT NULL,
        vector BLOB NOT NULL, PRIMARY KEY (platform, item_id)
    ) WITHOUT ROWID;
    """

    def __init__(self, path: str | Path, max_queue_batches: int = 1024,
                 max_events_per_commit: int = 20000):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        conn.executescript(self.SCHEMA)
        # Stores made before conflicts were counted: their ids have no digest (NULL).
        if "digest" not in {row[1] for row in conn.execute("PRAGMA table_info(event_ids)")}:
            conn.execute("ALTER TABLE event_ids ADD COLUMN digest TEXT")
        self._checkpoint_due = False
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue_batches)
        self._max_events_per_commit = max_events_per_commit
        self._closed = False
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="sqlite-writer",
                                        daemon=True)
        self._writer.start()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # Zero deleted content, also in freed pages, whatever SQLite was built with: a
            # deleted user's rows must not linger in free space (README, "Deleting a user").
            conn.execute("PRAGMA secure_delete=ON")
            self._local.conn = conn
        return conn

    # --- writes: one thread, group commit -------------------------------------------------
    def _enqueue(self, op: str, payload, block: bool) -> Future:
        done: Future = Future()
        with self._lock:  # no job can slip in behind the stop marker
            if self._closed:
                raise NotReady("profile store is closed")
            try:
                self._queue.put((op, payload, done), block=block)
            except queue.Full:
                raise Overloaded(f"ingest queue is full ({self._queue.maxsize} batches); "
                                 "retry with backoff") from None
        return done

    def append(self, events, timeout_s=None):
        done = self._enqueue("append", events, block=False)
        try:
            return done.result(timeout_s)
        except TimeoutError:
            raise BudgetSpent("deadline passed while the batch waited for its commit; it may "
                              "still be stored: re-sending it is safe (ids dedupe)") from None

    def delete_user(self, user_id, timeout_s=None):
        done = self._enqueue("delete", user_id, block=True)
        try:
            return done.result(timeout_s)
        except TimeoutError:
            raise BudgetSpent("deadline passed while the delete waited for its commit; it may "
                              "still be applied: re-sending it is safe") from None

    def put_items(self, items, timeout_s=None):
        if not items:
            return
        done = self._enqueue("items", items, block=True)
        try:
            done.result(timeout_s)
        except TimeoutError:
            raise BudgetSpent("deadline passed while item vectors waited for their commit"
                              ) from None

    def _write_loop(self) -> None:
        conn = self._conn()
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(
                    timeout=DELETE_CHECKPOINT_RETRY_S if self._checkpoint_due else None)
            except queue.Empty:
                self._checkpoint(conn)
                continue
            if first is None:
                return
            jobs, size = [first], self._job_size(first)
            while size < self._max_events_per_commit:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
                size += self._job_size(job)
            self._commit(conn, jobs)

    @staticmethod
    def _job_size(job) -> int:
        return 1 if job[0] == "delete" else len(job[1])

    def _commit(self, conn: sqlite3.Connection, jobs: list) -> None:
        """Apply the jobs in one transaction; ack each once it is on disk. Never raises."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = [self._apply(conn, op, payload) for op, payload, _ in jobs]
            conn.execute("COMMIT")
        except Exception as err:  # noqa: BLE001 - every waiter learns of the failure
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for _, _, done in jobs:
                done.set_exception(NotReady(f"profile store write failed: {err}"))
            return
        deletes = [(done, result) for (op, _, done), result in zip(jobs, results)
                   if op == "delete"]
        for (op, _, done), result in zip(jobs, results):
            if op != "delete":
                done.set_result(result)
        if deletes:
            # The deleted rows' older page images are in the WAL until it is checkpointed and
            # truncated; acknowledge the delete once that is done (or retried from now on).
            self._checkpoint_due = True
            self._checkpoint(conn)
            for done, result in deletes:
                done.set_result(result)

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Checkpoint the WAL into the database and truncate it, waiting for readers on an
        older snapshot at most DELETE_CHECKPOINT_WAIT_MS; still due if they held it off.
        Never raises (a failure is retried by the write loop)."""
        try:
            conn.execute(f"PRAGMA busy_timeout={DELETE_CHECKPOINT_WAIT_MS}")
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except sqlite3.Error as err:
            log.warning("checkpoint after a delete failed; retrying",
                        extra={"fields": {"error": str(err)}})
            return
        self._checkpoint_due = bool(busy)

    def _apply(self, conn, op, payload):
        if op == "append":
            return self._append(conn, payload)
        if op == "delete":
            return self._delete(conn, payload)
        conn.executemany(
            "INSERT OR REPLACE INTO items (platform, item_id, text, vector) VALUES (?,?,?,?)",
            [(p, i, text, np.asarray(vec, np.float32).tobytes())
             for (p, i), (text, vec) in payload.items()])
        return None

    def _append(self, conn, events: list[Event]) -> tuple[int, int, int]:
        by_user: dict[str, list[Event]] = defaultdict(list)
        for e in events:
            by_user[e.user_id].append(e)
        new: list[Event] = []
        digests: list[str] = []
        conflicts = 0
        for user, user_events in by_user.items():
            ids = list({e.event_id for e in user_events})
            known: dict[str, str | None] = {}  # event id -> digest (None: stored without one)
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                known.update((r[0], r[1]) for r in conn.execute(
                    f"SELECT event_id, digest FROM event_ids WHERE user_id=? AND event_id IN "
                    f"({','.join('?' * len(chunk))})", [user, *chunk]))
            for e in user_events:
                digest = event_digest(e)
                if e.event_id not in known:
                    known[e.event_id] = digest
                    new.append(e)
                    digests.append(digest)
                elif known[e.event_id] not in (None, digest):
                    conflicts += 1
        conn.executemany("INSERT INTO event_ids (user_id, event_id, digest) VALUES (?, ?, ?)",
                         [(e.user_id, e.event_id, d) for e, d in zip(new, digests)])
        conn.executemany(
            "INSERT OR REPLACE INTO recent (user_id, platform, event_time_ms, event_id, action, "
            "item_id, weight) VALUES (?,?,?,?,?,?,?)",
            [(e.user_id, e.platform, e.event_time_ms, e.event_id, e.action, e.item_id, e.weight)
             for e in new])
        touched: dict[tuple[str, str], list[Event]] = defaultdict(list)
        for e in new:
            touched[(e.user_id, e.platform)].append(e)
        conn.executemany(
            "INSERT INTO stats (user_id, platform, count, last_seen_ms) VALUES (?,?,?,?) "
            "ON CONFLICT (user_id, platform) DO UPDATE SET count = count + excluded.count, "
            "last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
            [(u, p, len(es), max(e.event_time_ms for e in es)) for (u, p), es in touched.items()])
        per_item: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for e in new:
            stat = per_item[(e.platform, e.item_id)]
            stat[0] += 1
            stat[1] = max(stat[1], e.event_time_ms)
        conn.executemany(
            "INSERT INTO item_stats (platform, item_id, count, last_event_ms) VALUES (?,?,?,?) "
            "ON CONFLICT (platform, item_id) DO UPDATE SET count = count + excluded.count, "
            "last_event_ms = max(last_event_ms, excluded.last_event_ms)",
            [(p, i, c, t) for (p, i), (c, t) in per_item.items()])
        conn.executemany(
            "DELETE FROM recent WHERE user_id=? AND platform=? AND (event_time_ms, event_id) < "
            "(SELECT event_time_ms, event_id FROM recent WHERE user_id=? AND platform=? "
            "ORDER BY event_time_ms DESC, event_id DESC LIMIT 1 OFFSET ?)",
            [(u, p, u, p, RECENT_PER_PLATFORM - 1) for (u, p) in touched])
        return len(new), len(events) - len(new), conflicts

    @staticmethod
    def _delete(conn, user_id: str) -> int:
        count = conn.execute("SELECT COALESCE(SUM(count), 0) FROM stats WHERE user_id=?",
                             (user_id,)).fetchone()[0]
        for table in ("event_ids", "recent", "stats"):
            conn.execute(f"DELETE FROM {table} WHERE user_id=?", (user_id,))
        return int(count)

    # --- reads: any thread, own connection ------------------------------------------------
    def history(self, user_id, timeout_s=None):
        conn = self._conn()
        out: dict[str, PlatformHistory] = {}
        conn.execute("BEGIN")  # one WAL snapshot for stats and events
        try:
            for platform, count, last_seen in conn.execute(
                    "SELECT platform, count, last_seen_ms FROM stats WHERE user_id=?", (user_id,)):
                out[platform] = PlatformHistory([], count, last_seen)
            for platform, time_ms, event_id, action, item_id, weight in conn.execute(
                    "SELECT platform, event_time_ms, event_id, action, item_id, weight FROM recent "
                    "WHERE user_id=? ORDER BY platform, event_time_ms, event_id", (user_id,)):
                out.setdefault(platform, PlatformHistory()).events.append(Event(
                    event_id, user_id, platform, action, item_id, "", time_ms, weight))
        finally:
            conn.execute("COMMIT")
        return out

    def item_stats(self, platform, limit, timeout_s=None):
        return [tuple(r) for r in self._conn().execute(
            "SELECT item_id, count, last_event_ms FROM item_stats WHERE platform=? "
            "ORDER BY count DESC, last_event_ms DESC LIMIT ?", (platform, limit))]

    def get_items(self, keys, timeout_s=None):
        conn = self._conn()
        out = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 400):
            chunk = unique[start:start + 400]
            where = " OR ".join(["(platform=? AND item_id=?)"] * len(chunk))
            for platform, item_id, text, blob in conn.execute(
                    f"SELECT platform, item_id, text, vector FROM items WHERE {where}",
                    [v for key in chunk for v in key]):
                out[(platform, item_id)] = (text, np.frombuffer(blob, dtype=np.float32))
        return out

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._writer.join(30)
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
