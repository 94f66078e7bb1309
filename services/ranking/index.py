"""Per-platform nearest-neighbour index over L2-normalised item vectors (inner product).

`exact`: a numpy matmul over every live row (faster than single-query faiss Flat on few
cores, and exact). `hnsw`: faiss IndexHNSWFlat, for catalogues too large to scan per request.
Upserts append rows; replaced or deleted rows become tombstones filtered at search time, and
the index is rebuilt once tombstones pass a quarter of the rows.
"""

from __future__ import annotations

import threading

import numpy as np

EXACT, HNSW = "exact", "hnsw"


class PlatformIndex:
    """Item vectors of one platform. Thread-safe; searches run concurrently with each other."""

    # HNSW: M 32 with efConstruction 64 builds 1M x 384 in minutes on 2 cores (efConstruction
    # 200 took over 14); efSearch 128 (raised to k for large k) gives the recall@10 in
    # bench/results/recommend.json.
    def __init__(self, dim: int, kind: str = EXACT, hnsw_m: int = 32,
                 ef_construction: int = 64, ef_search: int = 128):
        if kind not in (EXACT, HNSW):
            raise ValueError(f"index kind must be {EXACT} or {HNSW}, got {kind!r}")
        self.dim, self.kind = dim, kind
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self._vectors = np.zeros((0, dim), np.float32)
        self._ids: list[str] = []
        self._alive = np.zeros(0, bool)
        self._row: dict[str, int] = {}
        self._faiss = None
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._row)

    @property
    def item_ids(self) -> list[str]:
        with self._lock:
            return list(self._row)

    def upsert(self, item_ids: list[str], vectors: np.ndarray) -> None:
        """Add or replace items; vectors float32 [n, dim]."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock:
            start = len(self._ids)
            for item_id in item_ids:
                old = self._row.get(item_id)
                if old is not None:
                    self._alive[old] = False
            for offset, item_id in enumerate(item_ids):
                self._row[item_id] = start + offset
            self._ids.extend(item_ids)
            self._vectors = np.concatenate([self._vectors, vectors])
            self._alive = np.concatenate([self._alive, np.ones(len(item_ids), bool)])
            if self.kind == HNSW:
                if self._faiss is None:
                    self._rebuild()
                else:
                    self._faiss.add(vectors)
            self._maybe_compact()

    def delete(self, item_ids: list[str]) -> int:
        with self._lock:
            gone = 0
            for item_id in item_ids:
                row = self._row.pop(item_id, None)
                if row is not None:
                    self._alive[row] = False
                    gone += 1
            self._maybe_compact()
            return gone

    def vectors(self, item_ids: list[str]) -> np.ndarray:
        """float32 [n, dim] of live items (KeyError for an unknown id)."""
        with self._lock:
            return self._vectors[[self._row[i] for i in item_ids]]

    def live_vectors(self, item_ids: list[str]) -> tuple[list[str], np.ndarray]:
        """(the ids still live, in order; their float32 [n, dim] vectors): a search's or a
        lookup's ids may have been deleted by another writer since."""
        with self._lock:
            kept = [i for i in item_ids if i in self._row]
            return kept, self._vectors[[self._row[i] for i in kept]]

    def search(self, query: np.ndarray, k: int, exclude: set[str] = frozenset()
               ) -> tuple[list[str], np.ndarray]:
        """Top-k live items by inner product with `query` float32 [dim], best first."""
        with self._lock:
            vectors, ids, alive, index = self._vectors, self._ids, self._alive, self._faiss
            row_of, live = self._row, len(self._row)
        k = min(k, live)
        if k <= 0:
            return [], np.zeros(0, np.float32)
        query = np.ascontiguousarray(query, dtype=np.float32)
        if self.kind == EXACT or index is None:
            scores = vectors @ query
            scores[~alive] = -np.inf
            for item_id in exclude:
                row = row_of.get(item_id)
                if row is not None and row < len(scores):
                    scores[row] = -np.inf
            want = min(k, int(np.isfinite(scores).sum()))
            top = np.argpartition(-scores, want - 1)[:want] if want else np.zeros(0, int)
            top = top[np.argsort(-scores[top], kind="stable")]
            return [ids[r] for r in top], scores[top]
        fetch = k + len(exclude) + len(ids) - live
        while True:
            index.hnsw.efSearch = max(self.ef_search, fetch)
            scores, rows = index.search(query[None, :], min(fetch, len(ids)))
            keep = [(r, s) for r, s in zip(rows[0], scores[0])
                    if r >= 0 and alive[r] and ids[r] not in exclude]
            if len(keep) >= k or fetch >= len(ids):
                keep = keep[:k]
                return [ids[r] for r, _ in keep], np.asarray([s for _, s in keep], np.float32)
            fetch *= 2

    def _maybe_compact(self) -> None:
        dead = len(self._ids) - len(self._row)
        if dead > 1000 and dead > len(self._ids) // 4:
            order = sorted(self._row.items(), key=lambda kv: kv[1])
            self._vectors = self._vectors[[r for _, r in order]]
            self._ids = [i for i, _ in order]
            self._row = {i: n for n, i in enumerate(self._ids)}
            self._alive = np.ones(len(self._ids), bool)
            if self.kind == HNSW:
                self._rebuild()

    def _rebuild(self) -> None:
        import faiss
        index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        if len(self._vectors):
            index.add(self._vectors)
        self._faiss = index
