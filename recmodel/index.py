"""Per-platform nearest-neighbour index over L2-normalised item vectors (inner product).

Items are integer rows. Every write publishes a new immutable `IndexSnapshot` (ids, vectors,
alive mask, faiss index); a request works on one snapshot from retrieval to the k items it
returns, so a concurrent upsert or delete can neither renumber its rows nor change them under
it. Upserts append rows; replaced or deleted rows become tombstones (alive False), and the
rows are compacted once tombstones pass a quarter of them.

Kinds (`exact_search` and faiss; chosen per catalogue size by bench/recommend.py's end
NDCG@10 and latency):
- `exact`: a numpy matmul over every row: exact, reads all n x dim float32 per call.
- `fp16` / `sq8`: faiss IndexScalarQuantizer (16 or 8 bits per dimension: a half or a quarter
  of the bytes to read) picks SQ_RESCORE x k rows, which are then re-scored exactly in
  float32: the returned rows and their order are exact dot products, only which rows make
  the borderline of the k can differ from `exact`.
- `pca`: the rows projected onto the item vectors' top principal directions (a dim x r
  projection that the ranker export writes beside the ranker, export/rank_data.py, so every
  replica and the offline evaluation project alike) are scanned exactly in r dimensions;
  PCA_SHORTLIST x k rows by that score are re-scored exactly in float32: a quarter of the
  bytes of `exact` scanned, plus the shortlist's rows.
- `ivf`: faiss IndexIVFFlat (nlist ~ 4 sqrt(n) lists, nprobe of them searched), trained on
  the rows present when it is (re)built; a shortlist re-scored the same way.
- `hnsw`: faiss IndexHNSWFlat; its top max(k, ef_search) rows re-scored the same way.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

EXACT, PCA, FP16, SQ8, IVF, HNSW = "exact", "pca", "fp16", "sq8", "ivf", "hnsw"
KINDS = (EXACT, PCA, FP16, SQ8, IVF, HNSW)
# pca: rows shortlisted per row returned, by projected score, before exact re-scoring.
PCA_SHORTLIST = 2
# fp16 / sq8 fetch this many times k rows by quantised score before exact re-scoring.
SQ_RESCORE = 2
# ivf: lists searched per query; an index with fewer rows than IVF_MIN_ROWS is searched
# exactly (k-means needs data, and a small catalogue scans fast).
IVF_NPROBE = 32
IVF_MIN_ROWS = 20_000
# sq8's fixed per-coordinate range: coordinates of unit vectors in hundreds of dimensions
# sit well inside it (MiniLM's largest on the real catalogue: see bench/recommend.py), and a
# fixed range makes the codes independent of which items came first, so an index built
# from a bulk load and one grown item by item quantise alike.
SQ_RANGE = 0.5


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k highest finite `scores` float32 [n], best first, ties by row (the lower
    row first): deterministic, so training, evaluation and serving order ties alike."""
    finite = np.isfinite(scores)
    k = min(k, int(finite.sum()))
    if k <= 0:
        return np.zeros(0, np.int64)
    if k < len(scores):
        kth = -np.partition(-scores, k - 1)[k - 1]
        rows = np.flatnonzero(scores >= kth)
    else:
        rows = np.flatnonzero(finite)
    return rows[np.lexsort((rows, -scores[rows]))][:k].astype(np.int64)


def shortlist_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Ascending rows of at least the k highest finite `scores` (every row tied with the
    k-th included): a candidate set for exact re-scoring, no order needed."""
    finite = np.isfinite(scores)
    k = min(k, int(finite.sum()))
    if k <= 0:
        return np.zeros(0, np.int64)
    if k == len(scores):
        return np.flatnonzero(finite)
    kth = -np.partition(-scores, k - 1)[k - 1]
    return np.flatnonzero(scores >= kth)


def exact_search(vectors: np.ndarray, query: np.ndarray, k: int,
                 blocked: np.ndarray | None = None) -> np.ndarray:
    """Top-k rows of `vectors` float32 [n, dim] by dot product with `query` float32 [dim],
    best first, ties by row; `blocked` bool [n] rows are never returned."""
    scores = vectors @ query
    if blocked is not None:
        scores[blocked] = -np.inf
    return top_rows(scores, k)


@dataclass(frozen=True)
class IndexSnapshot:
    """One platform's items at one moment; never changed once published."""
    generation: int
    ids: list[str]                 # row -> item id (dead rows keep theirs)
    vectors: np.ndarray            # float32 [rows, dim]
    alive: np.ndarray              # bool [rows]
    row_of: dict[str, int]         # live item id -> row
    kind: str = EXACT
    faiss: object | None = None    # fp16 / sq8 / ivf / hnsw index over every row (dead too)
    ef_search: int = 128
    projection: np.ndarray | None = None  # pca: float32 [dim, r]
    projected: np.ndarray | None = None   # pca: float32 [rows, r] = vectors @ projection

    def __len__(self) -> int:
        return len(self.row_of)

    def search(self, query: np.ndarray, k: int, blocked: np.ndarray | None = None
               ) -> np.ndarray:
        """Top-k live rows by dot(vector, query float32 [dim]), best first, ties by row;
        `blocked` bool [rows] marks rows to leave out (e.g. the user's seen items)."""
        query = np.ascontiguousarray(query, dtype=np.float32)
        dead = ~self.alive if blocked is None else (~self.alive | blocked)
        if self.kind == PCA and self.projected is not None:
            scores = self.projected @ (query @ self.projection)
            scores[dead] = -np.inf
            return self._rescore(shortlist_rows(scores, PCA_SHORTLIST * k), query, k)
        if self.faiss is None or self.kind in (EXACT, PCA):
            return exact_search(self.vectors, query, k, dead)
        # An approximate shortlist, then exact float32 scores over it: the answer's order is
        # the exact one, and only which rows make the shortlist is approximate.
        n_dead = int(dead.sum())
        fetch = min(len(self.ids), (max(k, self.ef_search) if self.kind == HNSW
                                    else SQ_RESCORE * k if self.kind in (FP16, SQ8)
                                    else k) + n_dead)
        if self.kind == HNSW:
            self.faiss.hnsw.efSearch = max(self.ef_search, fetch)
        _, found = self.faiss.search(query[None, :], fetch)
        rows = found[0]
        rows = rows[(rows >= 0) & (rows < len(self.ids))]
        return self._rescore(np.sort(rows[~dead[rows]]), query, k)

    def _rescore(self, rows: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
        """The k best of a shortlist (ascending rows: top_rows' ties by position = by row) by
        exact float32 dot product."""
        return rows[top_rows(self.vectors[rows] @ query, k)]


class PlatformIndex:
    """Item vectors of one platform. Thread-safe: writers publish snapshots, readers take one."""

    # HNSW: M 32 with efConstruction 64 builds 1M x 384 in minutes on 2 cores (efConstruction
    # 200 took over 14); efSearch 128 (raised to k for large k).
    def __init__(self, dim: int, kind: str = EXACT, hnsw_m: int = 32,
                 ef_construction: int = 64, ef_search: int = 128,
                 projection: np.ndarray | None = None):
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        if kind == PCA and (projection is None or projection.shape[0] != dim):
            raise ValueError(f"index kind pca needs a [{dim}, r] projection")
        self.dim, self.kind = dim, kind
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.projection = (None if projection is None
                           else np.ascontiguousarray(projection, dtype=np.float32))
        r = 0 if self.projection is None else self.projection.shape[1]
        self._snap = IndexSnapshot(0, [], np.zeros((0, dim), np.float32), np.zeros(0, bool),
                                   {}, kind, None, ef_search, self.projection,
                                   np.zeros((0, r), np.float32) if kind == PCA else None)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._snap.row_of)

    def snapshot(self) -> IndexSnapshot:
        return self._snap

    @property
    def item_ids(self) -> list[str]:
        return list(self._snap.row_of)

    def upsert(self, item_ids: list[str], vectors: np.ndarray) -> None:
        """Add or replace items; vectors float32 [n, dim]. A repeated id: the last one wins."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock:
            old = self._snap
            alive = np.concatenate([old.alive, np.ones(len(item_ids), bool)])
            row_of = dict(old.row_of)
            start = len(old.ids)
            for offset, item_id in enumerate(item_ids):
                prev = row_of.get(item_id)
                if prev is not None:
                    alive[prev] = False
                row_of[item_id] = start + offset
            ids = old.ids + list(item_ids)
            all_vectors = np.concatenate([old.vectors, vectors])
            index = old.faiss
            projected = None
            if self.kind == PCA:
                # In float64, then rounded: a row's projection then does not depend on the
                # batch it came in (BLAS kernels differ by shape), so a catalogue loaded in
                # batches and one built at once shortlist alike.
                new = vectors.astype(np.float64) @ self.projection.astype(np.float64)
                projected = np.concatenate([old.projected, new.astype(np.float32)])
            elif self.kind != EXACT:
                if index is None:
                    index = self._build(all_vectors)
                else:
                    index.add(vectors)  # rows past an older snapshot's are filtered there
            self._publish(ids, all_vectors, alive, row_of, index, projected)

    def delete(self, item_ids: list[str]) -> int:
        with self._lock:
            old = self._snap
            row_of = dict(old.row_of)
            alive = old.alive.copy()
            gone = 0
            for item_id in item_ids:
                row = row_of.pop(item_id, None)
                if row is not None:
                    alive[row] = False
                    gone += 1
            if gone:
                self._publish(old.ids, old.vectors, alive, row_of, old.faiss, old.projected)
            return gone

    def vectors(self, item_ids: list[str]) -> np.ndarray:
        """float32 [n, dim] of live items (KeyError for an unknown id)."""
        snap = self._snap
        return snap.vectors[[snap.row_of[i] for i in item_ids]]

    def live_vectors(self, item_ids: list[str]) -> tuple[list[str], np.ndarray]:
        """(the ids still live, in order; their float32 [n, dim] vectors)."""
        snap = self._snap
        kept = [i for i in item_ids if i in snap.row_of]
        return kept, snap.vectors[[snap.row_of[i] for i in kept]]

    def search(self, query: np.ndarray, k: int, exclude: set[str] = frozenset()
               ) -> tuple[list[str], np.ndarray]:
        """Top-k live items by inner product with `query` float32 [dim], best first: (ids,
        float32 scores)."""
        snap = self._snap
        blocked = None
        if exclude:
            blocked = np.zeros(len(snap.ids), bool)
            blocked[[snap.row_of[i] for i in exclude if i in snap.row_of]] = True
        rows = snap.search(query, k, blocked)
        return [snap.ids[r] for r in rows], snap.vectors[rows] @ np.asarray(query, np.float32)

    def _publish(self, ids, vectors, alive, row_of, index, projected=None) -> None:
        dead = len(ids) - len(row_of)
        if dead > 1000 and dead > len(ids) // 4:
            keep = np.flatnonzero(alive)
            ids = [ids[r] for r in keep]
            vectors = vectors[keep]
            alive = np.ones(len(ids), bool)
            row_of = {i: n for n, i in enumerate(ids)}
            index = self._build(vectors) if self.kind not in (EXACT, PCA) else None
            projected = None if projected is None else projected[keep]
        self._snap = IndexSnapshot(self._snap.generation + 1, ids, vectors, alive, row_of,
                                   self.kind, index, self.ef_search, self.projection,
                                   projected)

    def _build(self, vectors: np.ndarray):
        import faiss
        if self.kind in (FP16, SQ8):
            qtype = (faiss.ScalarQuantizer.QT_fp16 if self.kind == FP16
                     else faiss.ScalarQuantizer.QT_8bit)
            index = faiss.IndexScalarQuantizer(self.dim, qtype, faiss.METRIC_INNER_PRODUCT)
            index.train(np.array([[-SQ_RANGE] * self.dim, [SQ_RANGE] * self.dim],
                                 np.float32))
        elif self.kind == IVF:
            if len(vectors) < IVF_MIN_ROWS:
                return None  # searched exactly until a rebuild finds enough rows
            nlist = int(min(4096, 4 * np.sqrt(len(vectors))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist,
                                       faiss.METRIC_INNER_PRODUCT)
            # A fixed, evenly spaced sample and seed: the same rows train the same lists.
            step = max(1, len(vectors) // (64 * nlist))
            index.cp.seed = 1234
            index.train(np.ascontiguousarray(vectors[::step]))
            index.nprobe = IVF_NPROBE
        else:
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
        if len(vectors):
            index.add(vectors)
        return index


# Items per platform above which "auto" indexes with HNSW (bench/recommend.py: pca's scan
# stops being cheap there).
HNSW_THRESHOLD = 200_000


def index_kind(requested: str, size: int, hnsw_threshold: int, has_projection: bool) -> str:
    """The index kind of a platform with `size` items: `requested` unless "auto", which is
    pca (exact without the ranker's projection) up to `hnsw_threshold` items, HNSW above.
    The same rule for serving and the offline evaluation (export/rank_data.py)."""
    if requested != "auto":
        return requested
    if size > hnsw_threshold:
        return HNSW
    return PCA if has_projection else EXACT
