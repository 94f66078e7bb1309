"""Item catalogue: items and their vectors, durable in SQLite, searchable per platform.

An upsert is committed to disk (WAL, synchronous=FULL) before it is applied to the in-memory
index, and the index is rebuilt from the file at start, so an acknowledged item survives a
restart and is retrievable as soon as its upsert returns. The file belongs to one process:
for a catalogue that several replicas share, see redis_catalog.py. Both keep the whole
catalogue in memory (MemoryCatalog) and offer the same methods.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.ranking.index import EXACT, HNSW, KINDS, PCA, PlatformIndex

# Items per platform above which "auto" indexes with HNSW (bench/recommend.py: pca's scan
# stops being cheap there).
HNSW_THRESHOLD = 200_000


def index_kind(requested: str, size: int, hnsw_threshold: int, has_projection: bool) -> str:
    """The index kind of a platform with `size` items: `requested` unless "auto", which is
    pca (exact without the ranker's projection) up to `hnsw_threshold` items, HNSW above.
    The same rule for serving and the offline evaluation (export/evaluate.py)."""
    if requested != "auto":
        return requested
    if size > hnsw_threshold:
        return HNSW
    return PCA if has_projection else EXACT


@dataclass(frozen=True)
class CatalogItem:
    item_id: str
    platform: str
    title: str
    attributes: dict[str, str] = field(default_factory=dict)
    text: str = ""  # what the vector was embedded from (title + attribute values)


# One stored item as backends read it: (item_id, title, attributes JSON, text, float32 bytes).
Row = tuple[str, str, str, str, bytes]


class MemoryCatalog:
    """The in-memory side of a catalogue: items and one index per platform, read lock-free by
    any thread, changed by one writer at a time (the backend's). `index` is exact, hnsw, or
    auto (HNSW once a platform has more than `hnsw_threshold` items; exact below, where a
    scan is both exact and fast enough)."""

    def __init__(self, dim: int, index: str = "auto", hnsw_threshold: int = HNSW_THRESHOLD,
                 projection: np.ndarray | None = None):
        if index not in ("auto", *KINDS):
            raise ValueError(f"index must be auto or one of {KINDS}, got {index!r}")
        if index == PCA and projection is None:
            raise ValueError("index pca needs the ranker's retrieval projection")
        self.dim = dim
        self.index_kind, self.hnsw_threshold = index, hnsw_threshold
        self.projection = projection
        self._items: dict[str, dict[str, CatalogItem]] = {}
        self._indexes: dict[str, PlatformIndex] = {}

    def _kind(self, size: int) -> str:
        return index_kind(self.index_kind, size, self.hnsw_threshold,
                          self.projection is not None)

    def _new_index(self, size: int) -> PlatformIndex:
        return PlatformIndex(self.dim, self._kind(size), projection=self.projection)

    def _replace_all(self, rows: dict[str, list[Row]]) -> None:
        """Swap in the whole catalogue `rows` per platform; readers see the old or the new."""
        items: dict[str, dict[str, CatalogItem]] = {}
        indexes: dict[str, PlatformIndex] = {}
        for platform, platform_rows in rows.items():
            items[platform] = {i: CatalogItem(i, platform, t, json.loads(a), x)
                               for i, t, a, x, _ in platform_rows}
            index = self._new_index(len(platform_rows))
            index.upsert([i for i, *_ in platform_rows],
                         np.frombuffer(b"".join(r[-1] for r in platform_rows), np.float32)
                         .reshape(len(platform_rows), self.dim))
            indexes[platform] = index
        self._items, self._indexes = items, indexes

    def platforms(self) -> list[str]:
        return sorted(p for p, items in self._items.items() if items)

    def size(self, platform: str) -> int:
        return len(self._items.get(platform, {}))

    def index(self, platform: str) -> PlatformIndex | None:
        return self._indexes.get(platform)

    def get(self, platform: str, item_id: str) -> CatalogItem | None:
        return self._items.get(platform, {}).get(item_id)

    def item_ids(self, platform: str) -> list[str]:
        return list(self._items.get(platform, {}))

    def _apply_upsert(self, items: list[CatalogItem], vectors: np.ndarray) -> None:
        """Make stored items (float32 [n, dim] vectors) searchable; the writer's lock held."""
        by_platform: dict[str, list[int]] = {}
        for n, it in enumerate(items):
            by_platform.setdefault(it.platform, []).append(n)
        for platform, rows in by_platform.items():
            stored = self._items.setdefault(platform, {})
            for n in rows:
                stored[items[n].item_id] = items[n]
            index = self._indexes.get(platform)
            if index is None:
                index = self._indexes[platform] = self._new_index(len(rows))
            index.upsert([items[n].item_id for n in rows], vectors[rows])
            if index.kind != HNSW and self._kind(len(index)) == HNSW:
                self._indexes[platform] = self._reindexed(index, HNSW)

    def _reindexed(self, old: PlatformIndex, kind: str) -> PlatformIndex:
        ids = old.item_ids
        index = PlatformIndex(self.dim, kind, projection=self.projection)
        index.upsert(ids, old.vectors(ids))
        return index

    def _apply_delete(self, platform: str, item_ids: list[str]) -> int:
        """Drop items from memory (the writer's lock held); the number that were there."""
        stored = self._items.get(platform, {})
        gone = [i for i in dict.fromkeys(item_ids) if stored.pop(i, None) is not None]
        if gone:
            self._indexes[platform].delete(gone)
        return len(gone)


class Catalog(MemoryCatalog):
    """SQLite-backed, one process. Thread-safe; see MemoryCatalog for `index`."""

    def __init__(self, path: str | Path, dim: int, index: str = "auto",
                 hnsw_threshold: int = HNSW_THRESHOLD, projection: np.ndarray | None = None):
        super().__init__(dim, index, hnsw_threshold, projection)
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS items (platform TEXT NOT NULL, item_id TEXT NOT NULL, "
            "title TEXT NOT NULL, attributes TEXT NOT NULL, text TEXT NOT NULL, "
            "vector BLOB NOT NULL, PRIMARY KEY (platform, item_id)) WITHOUT ROWID")
        self._write_lock = threading.Lock()
        rows: dict[str, list[Row]] = {}
        for platform, item_id, title, attrs, text, blob in self._db.execute(
                "SELECT platform, item_id, title, attributes, text, vector FROM items"):
            rows.setdefault(platform, []).append((item_id, title, attrs, text, blob))
        self._replace_all(rows)

    def upsert(self, items: list[CatalogItem], vectors: np.ndarray,
               timeout_s: float | None = None) -> None:
        """Store items with float32 [n, dim] vectors durably, then make them searchable.
        `timeout_s` is accepted for the interface's sake: a local commit has no remote wait."""
        vectors = np.asarray(vectors, np.float32)
        with self._write_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO items (platform, item_id, title, attributes, text, "
                    "vector) VALUES (?,?,?,?,?,?)",
                    [(it.platform, it.item_id, it.title, json.dumps(it.attributes), it.text,
                      vec.tobytes()) for it, vec in zip(items, vectors)])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._apply_upsert(items, vectors)

    def delete(self, platform: str, item_ids: list[str], timeout_s: float | None = None) -> int:
        """Remove items; the number that existed (`timeout_s`: see upsert)."""
        with self._write_lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM items WHERE platform=? AND item_id=?",
                                 [(platform, i) for i in item_ids])
            self._db.execute("COMMIT")
            return self._apply_delete(platform, item_ids)

    def close(self) -> None:
        self._db.close()
