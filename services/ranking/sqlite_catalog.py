"""SQLite item catalogue: items and their vectors, durable in one file, searchable per platform.

An upsert is committed to disk (WAL, synchronous=FULL) before it is applied to the in-memory
index, and the index is rebuilt from the file at start, so an acknowledged item survives a
restart and is retrievable as soon as its upsert returns. Several processes on one machine
may share the file (the ranking service's worker processes): each write appends one row per
item to a `changes` table (an AUTOINCREMENT sequence) in its own transaction, and
`refresh()`, called before every Recommend, applies the current value of every item named
in rows past the last one this process reflected, so a write acknowledged by any process is
served by every process's next Recommend. Every process holds the rows in the order the
writes were made (the items' `written` column is the seq of their last write), whether it
took the write, caught up on it or loaded the file: ties between items break by row, and a
BLAS scan's float sums depend on a row's position (its last rows take another kernel), so
the same rows in the same order are what make every process, and the offline evaluation of
a catalogue loaded in its file order, give the same list. For a catalogue that replicas on
several machines share, see redis_catalog.py. Both keep the whole catalogue in memory
(MemoryCatalog) and offer the same methods (the Catalog interface, catalog.py).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from recmodel.index import HNSW_THRESHOLD
from services.common import metrics
from services.ranking.catalog import Catalog, CatalogItem, MemoryCatalog, Row

# The change log keeps this many rows (one per item written); a process further behind
# reloads the whole catalogue. Another process's write makes ours wait up to BUSY_TIMEOUT_S.
CHANGE_LOG_ROWS = 100_000
BUSY_TIMEOUT_S = 10.0
_SELECT_CHUNK = 500  # ids per IN (...) query: below SQLite's variable limit

log = logging.getLogger("crossrec.ranking")


def _set_wal(db: sqlite3.Connection) -> None:
    """journal_mode=WAL, retried while another process holds the file: SQLite answers a
    concurrent journal-mode change with "database is locked" at once, without waiting out the
    busy timeout (worker processes opening a new catalogue file together)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _add_write_order(db: sqlite3.Connection) -> None:
    """The items table's `written` column: the change-log seq of the item's last write, so
    that a process loading the file holds the rows in the order writes were applied (a file
    from before it gets the column, NULL: those items load first, in key order)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(items)")}
    if "written" not in columns:
        try:
            db.execute("ALTER TABLE items ADD COLUMN written INTEGER")
        except sqlite3.OperationalError as err:  # another process added it first
            if "duplicate column" not in str(err):
                raise


class SQLiteCatalog(MemoryCatalog, Catalog):
    """SQLite-backed; thread-safe; see MemoryCatalog for `index`. Several processes may open
    one file (the ranking service's worker processes do): every write also appends a row per
    item to the `changes` table, in the same transaction, and `refresh()` applies the rows
    other processes appended since this one last looked (module docstring)."""

    def __init__(self, path: str | Path, dim: int, index: str = "auto",
                 hnsw_threshold: int = HNSW_THRESHOLD, projection: np.ndarray | None = None):
        super().__init__(dim, index, hnsw_threshold, projection)
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # One connection, one lock: sqlite3 objects are not for concurrent use, and every
        # statement is short. Another process's write transaction makes ours wait up to
        # BUSY_TIMEOUT_S (workers start together and write the same file).
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_S)
        self._lock = threading.Lock()
        _set_wal(self._db)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS items (platform TEXT NOT NULL, item_id TEXT NOT NULL, "
            "title TEXT NOT NULL, attributes TEXT NOT NULL, text TEXT NOT NULL, "
            "vector BLOB NOT NULL, written INTEGER, PRIMARY KEY (platform, item_id)) "
            "WITHOUT ROWID")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "platform TEXT NOT NULL, item_id TEXT NOT NULL)")
        _add_write_order(self._db)
        self._seq = 0  # the last change-log row reflected in memory
        self._data_version = None
        self._closed = threading.Event()
        self._follower: threading.Thread | None = None
        with self._lock, self._read():
            self._load()

    @contextmanager
    def _read(self):
        """One read transaction: the statements in it see one state of the file."""
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def _load(self) -> None:
        """Every item, and the change-log position they reflect (in the caller's read
        transaction)."""
        self._seq = self._db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
        stored: dict[str, list[tuple]] = {}
        for platform, written, *row in self._db.execute(
                "SELECT platform, written, item_id, title, attributes, text, vector FROM items"):
            stored.setdefault(platform, []).append((-1 if written is None else written, row))
        rows: dict[str, list[Row]] = {}
        for platform, platform_rows in stored.items():
            platform_rows.sort(key=lambda r: r[0])  # write order; stable: key order before
            rows[platform] = [tuple(row) for _, row in platform_rows]
        self._replace_all(rows)

    def refresh(self) -> None:
        """Make what any process committed to the file so far searchable here. When nothing
        changed, one `PRAGMA data_version` (it changes when another connection commits):
        microseconds, see services/ranking/README.md."""
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:
                self._catch_up()
                self._data_version = version  # only once applied: a failure is retried

    def follow(self, every_s: float) -> None:
        """Also refresh() every `every_s` in a background thread until close(): a process
        that answers no Recommend for a while (no connection reached it) keeps up anyway,
        instead of applying a whole bulk load in its next Recommend."""
        def loop():
            while not self._closed.wait(every_s):
                try:
                    self.refresh()
                except Exception as err:  # noqa: BLE001 - the next Recommend retries it
                    if not self._closed.is_set():
                        log.warning("catalogue refresh failed", extra={"fields": {
                            "error": str(err)}})
        self._follower = threading.Thread(target=loop, name="catalog-follow", daemon=True)
        self._follower.start()

    def _catch_up(self) -> None:
        """Apply the current value of every item named in change-log rows past `_seq` (the
        lock held). Current values, not the rows' order, so a replay is harmless; a process
        that fell behind the trimmed log reloads everything."""
        with self._read():
            oldest, newest = self._db.execute(
                "SELECT min(seq), max(seq) FROM changes").fetchone()
            if newest is None or newest <= self._seq:
                return
            if oldest > self._seq + 1:
                self._load()
                self._set_sizes(self.platforms())
                return
            touched: dict[str, dict[str, None]] = {}
            for platform, item_id in self._db.execute(
                    "SELECT platform, item_id FROM changes WHERE seq > ? AND seq <= ?",
                    (self._seq, newest)):
                touched.setdefault(platform, {})[item_id] = None
            for platform, ids in touched.items():
                self._apply_current(platform, list(ids))
            self._seq = newest
        self._set_sizes(touched)

    def _apply_current(self, platform: str, item_ids: list[str]) -> None:
        """Apply the stored values of `item_ids`, in the order they were written (module
        docstring: every process holds the rows in one order), absent ones as deletes."""
        found: list[tuple] = []
        for start in range(0, len(item_ids), _SELECT_CHUNK):
            chunk = item_ids[start:start + _SELECT_CHUNK]
            found += self._db.execute(
                "SELECT written, item_id, title, attributes, text, vector FROM items WHERE "
                f"platform=? AND item_id IN ({','.join('?' * len(chunk))})",
                (platform, *chunk)).fetchall()
        found.sort(key=lambda row: row[0])
        if found:
            items = [CatalogItem(i, platform, t, json.loads(a), x)
                     for _, i, t, a, x, _ in found]
            self._apply_upsert(items, np.frombuffer(b"".join(row[-1] for row in found),
                                                    np.float32).reshape(len(items), self.dim))
        stored = {row[1] for row in found}
        self._apply_delete(platform, [i for i in item_ids if i not in stored])

    def _set_sizes(self, platforms) -> None:
        for platform in platforms:
            metrics.CATALOG_ITEMS.labels(platform).set(self.size(platform))

    def _write(self, sql: str, rows: list[tuple], keys: list[tuple[str, str]],
               numbered: bool = False) -> int:
        """Log `keys` (platform, item_id, one per row) and run `sql` over `rows` in one
        durable transaction, then catch up (this write and any other process's before it).
        `numbered`: each row gets its change-log seq appended (the items' `written`).
        Returns the rows `sql` changed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO changes (platform, item_id) VALUES (?,?)",
                                     keys)
                newest = self._db.execute("SELECT max(seq) FROM changes").fetchone()[0]
                # One writer holds the file (BEGIN IMMEDIATE): the rows just logged took the
                # seqs newest - len(keys) + 1 .. newest, in order.
                first = newest - len(keys) + 1
                if numbered:
                    rows = [(*row, first + n) for n, row in enumerate(rows)]
                changed = self._db.executemany(sql, rows).rowcount
                self._db.execute("DELETE FROM changes WHERE seq <= ?",
                                 (newest - CHANGE_LOG_ROWS,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._catch_up()
            return changed

    def upsert(self, items: list[CatalogItem], vectors: np.ndarray,
               timeout_s: float | None = None) -> None:
        """Store items with float32 [n, dim] vectors durably, then make them searchable.
        `timeout_s` is accepted for the interface's sake: a local commit has no remote wait."""
        vectors = np.asarray(vectors, np.float32)
        self._write("INSERT OR REPLACE INTO items (platform, item_id, title, attributes, "
                    "text, vector, written) VALUES (?,?,?,?,?,?,?)",
                    [(it.platform, it.item_id, it.title, json.dumps(it.attributes), it.text,
                      vec.tobytes()) for it, vec in zip(items, vectors)],
                    [(it.platform, it.item_id) for it in items], numbered=True)

    def delete(self, platform: str, item_ids: list[str], timeout_s: float | None = None) -> int:
        """Remove items; the number that existed in the file (`timeout_s`: see upsert)."""
        ids = list(dict.fromkeys(item_ids))
        return self._write("DELETE FROM items WHERE platform=? AND item_id=?",
                           [(platform, i) for i in ids], [(platform, i) for i in ids])

    def close(self) -> None:
        self._closed.set()
        if self._follower is not None:
            self._follower.join()
        with self._lock:
            self._db.close()
