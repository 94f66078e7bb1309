"""Item catalogue: the `Catalog` interface and `MemoryCatalog`, the in-memory half every
backend shares (items and one index per platform, searchable lock-free).

Backends: `SQLiteCatalog` (sqlite_catalog.py: one file, shared by one replica's worker
processes) and `RedisCatalog` (redis_catalog.py: shared by every replica). Each is a
MemoryCatalog that makes a write durable before it applies it in memory, and keeps every
process (or replica) in step with writes the others acknowledged; both hold the rows in the
order the writes were made (sqlite_catalog.py says why).
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from recmodel.index import HNSW, HNSW_THRESHOLD, KINDS, PCA, PlatformIndex, index_kind


@dataclass(frozen=True)
class CatalogItem:
    item_id: str
    platform: str
    title: str
    attributes: dict[str, str] = field(default_factory=dict)
    text: str = ""  # what the vector was embedded from (title + attribute values)


# One stored item as backends read it: (item_id, title, attributes JSON, text, float32 bytes).
Row = tuple[str, str, str, str, bytes]


class Catalog(Protocol):
    """What the ranking engine and server need of a catalogue. Every method is thread-safe.

    `timeout_s` on a write is the call's budget in seconds (None: the backend's own limits);
    past it the write raises BudgetSpent, not acknowledged but possibly applied, so re-sending
    it is safe (upserts and deletes are idempotent). The backends subclass MemoryCatalog (the
    reads) and this class (the writes they must define).
    """

    dim: int  # the vectors' dimension (the embedding model's)

    def platforms(self) -> list[str]:
        """Platforms holding at least one item, sorted."""
        ...

    def size(self, platform: str) -> int:
        """Items of `platform` (0: none)."""
        ...

    def index(self, platform: str) -> PlatformIndex | None:
        """The platform's nearest-neighbour index; None before its first item."""
        ...

    def get(self, platform: str, item_id: str) -> CatalogItem | None:
        ...

    def item_ids(self, platform: str) -> list[str]:
        """The platform's item ids, in the order the writes were made."""
        ...

    def refresh(self) -> None:
        """Bring this process's view up to date with writes other processes acknowledged."""
        ...

    def follow(self, every_s: float) -> None:
        """Also refresh() every `every_s` in the background until close()."""
        ...

    @abc.abstractmethod
    def upsert(self, items: list[CatalogItem], vectors: np.ndarray,
               timeout_s: float | None = None) -> None:
        """Store items with float32 [n, dim] vectors durably, then make them searchable
        here; others follow (refresh, or the backend's log tail)."""

    @abc.abstractmethod
    def delete(self, platform: str, item_ids: list[str], timeout_s: float | None = None) -> int:
        """Remove items durably; the number that existed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop background work and release the backend; later calls fail."""


class MemoryCatalog:
    """The in-memory half of every catalogue backend, with the reads of `Catalog`: items and
    one index per platform, read lock-free by any thread, changed by one writer at a time
    (the backend's, through `_replace_all`, `_apply_upsert` and `_apply_delete`). Not a
    catalogue by itself: it stores nothing (tests fill one through `_apply_upsert` as a
    read-only stand-in). `index` is exact, hnsw, or auto (HNSW once a platform has more than
    `hnsw_threshold` items; exact below, where a scan is both exact and fast enough)."""

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

    def refresh(self) -> None:
        """Bring this process's view up to date with writes other processes acknowledged
        (the SQLite catalogue); nothing here, nor for Redis, whose log tail follows them."""

    def follow(self, every_s: float) -> None:
        """Also refresh() every `every_s` in the background until close() (the SQLite
        catalogue); nothing here."""

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
