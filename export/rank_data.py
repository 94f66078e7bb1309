"""The ranker's and the offline evaluation's data: the catalogue with its item vectors, every
user's sequence and the user tower's split (RankData), one request's input (Query) and the
user's view of it through the served user-window layout (user_context). Torch-free."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import numpy as np

from dataio import AMAZON
from export import user_data as ud
from recmodel.events import Event
from recmodel.modelrepo import resolve, versions
from recmodel.user_model import BaselineUserModel, OnnxUserModel, Window, encode_user
from recmodel import pipeline
from recmodel.index import HNSW_THRESHOLD, index_kind
from recmodel.covisit import CoVisits
from recmodel.features import UserContext
from recmodel.index import PlatformIndex
from recmodel.pipeline import ItemTable

log = logging.getLogger("export.rank_data")

USER_TOWER = "user_tower"
# Retrieval (recmodel/index.py, kind pca) scans the item vectors projected onto their
# RETRIEVAL_DIMS top principal directions, computed here over the catalogue and written beside
# the ranker so serving and evaluation project alike. 96 of 384 dimensions: a quarter of the
# scan, and the exact top-1000 almost whole in the re-scored shortlist
# (bench/results/export-decisions.md); the end NDCG@10 of each index kind:
# bench/results/recommend.json.
RETRIEVAL_DIMS = 96


@dataclass
class RankData:
    """The catalogue, its item vectors and the users' sequences as the split gives them."""
    dataset: str
    ids: list[tuple[str, str]]         # catalogue rows: (platform, item_id)
    vecs: np.ndarray                   # float32 [n_items, dim], L2-normalised
    encoder: dict                      # {"name", "version"} of the item vectors
    split: ud.Split                    # train / validation / test sequences, sorted by user
    counts: np.ndarray                 # float64 [n_items] events per item, training sequences
    row_of: dict[tuple[str, str], int] = field(default_factory=dict)
    vocab: dict[str, int] = field(default_factory=dict)         # the split's platform vocab
    train_ids: set[str] = field(default_factory=set)            # users of split.train
    names: dict[int, str] = field(default_factory=dict)          # vocab id -> platform
    catalogue: dict[str, np.ndarray] = field(default_factory=dict)  # platform -> rows
    covisit: CoVisits | None = None    # co-visit counts of the training users (same rows)
    index_kind: str = "auto"           # the retrieval index (catalog.index_kind's rule)
    projection: np.ndarray | None = None  # float32 [dim, RETRIEVAL_DIMS] (retrieval_projection)
    # Per platform, its catalogue as the serving pipeline's table (table row j = global row
    # catalogue[p][j]; popularity from `counts`), and global row -> table row.
    tables: dict[str, ItemTable] = field(default_factory=dict)
    local: dict[int, int] = field(default_factory=dict)

    def __post_init__(self):
        self.row_of = {key: i for i, key in enumerate(self.ids)}
        self.vocab = self.split.vocab
        self.train_ids = {s.user_id for s in self.split.train}
        if self.covisit is None:
            self.covisit = CoVisits.from_users(self.ids, [s.items for s in self.split.train])
        if self.projection is None:
            self.projection = retrieval_projection(self.vecs)
        self.names = {i: name for name, i in self.vocab.items()}
        self.catalogue = {self.names[pid]: rows
                          for pid, rows in ud.catalogue_rows(self.ids, self.vocab).items()}
        self.tables = {p: self.table(p, self.counts[rows]) for p, rows in self.catalogue.items()}
        self.local = {int(r): j for rows in self.catalogue.values() for j, r in enumerate(rows)}

    def table(self, platform: str, counts: np.ndarray) -> ItemTable:
        """`platform`'s catalogue through the serving index and pipeline.item_table, with
        item event counts `counts` float [platform's items]."""
        rows = self.catalogue[platform]
        kind = index_kind(self.index_kind, len(rows), HNSW_THRESHOLD, True)
        index = PlatformIndex(self.vecs.shape[1], kind, projection=self.projection)
        index.upsert([self.ids[r][1] for r in rows], self.vecs[rows])
        return pipeline.item_table(platform, index.snapshot(), counts, self.covisit)

    def with_counts(self, counts: np.ndarray) -> "RankData":
        """The same data with other item event counts float [n_items] (popularity)."""
        return replace(self, counts=np.asarray(counts, np.float64))

    def with_vectors(self, vecs: np.ndarray, encoder: dict) -> "RankData":
        """The same data with another encoder's item vectors (same catalogue order)."""
        assert vecs.shape[0] == len(self.ids)
        return replace(self, vecs=vecs, encoder=encoder)


def retrieval_projection(vecs: np.ndarray, dims: int = RETRIEVAL_DIMS) -> np.ndarray:
    """float32 [dim, dims]: the top right-singular vectors of the item vectors (uncentered:
    the directions that carry most of their dot products)."""
    _, _, vt = np.linalg.svd(vecs.astype(np.float64), full_matrices=False)
    return np.ascontiguousarray(vt[:dims].T, dtype=np.float32)


def load_data(repo: str | os.PathLike = "models", dataset: str = AMAZON,
              encoder_version: int | None = None) -> RankData:
    """Item vectors (export.item_vectors cache), sequences and the user tower's split."""
    from export.item_vectors import ENCODER_NAME, encoder_ref, item_vectors

    _, enc_version, _ = encoder_ref(repo, encoder_version)
    ids, vecs = item_vectors(dataset, repo, enc_version)
    users, missing = ud.load_sequences(dataset, ids)
    if missing:
        log.warning("%d events dropped: item not in the catalogue", missing)
    split = ud.split_sequences(users)
    return RankData(dataset, ids, vecs, {"name": ENCODER_NAME, "version": enc_version},
                    split, ud.item_counts(split.train, len(ids)))


def load_user_model(repo: str | os.PathLike, version: int | None = None,
                    allow_baseline: bool = False, intra_op_threads: int = 2):
    """The trained user tower (OnnxUserModel); the untrained baseline when none is exported
    and `allow_baseline` (development only: the ranker's features then come from it).
    `intra_op_threads`: 2 for training's batches; the evaluation passes serving's."""
    if versions(repo, USER_TOWER) or not allow_baseline:
        return OnnxUserModel(resolve(repo, USER_TOWER, version),
                             intra_op_threads=intra_op_threads)
    log.warning("no %s in %s: using the untrained baseline user model", USER_TOWER, repo)
    return BaselineUserModel()



@dataclass
class Query:
    """One request: the user's input events (oldest first) and the platform to rank for."""
    user_id: str
    rows: np.ndarray          # int64 [n] catalogue rows of the input events
    actions: np.ndarray       # int64 [n] Action enum values
    weights: np.ndarray       # float32 [n]
    target_platform: str
    target_row: int = -1      # catalogue row of the true next item; -1 when unknown


def seq_query(data: RankData, s: ud.UserSeq, t: int, cold: bool,
              end: int | None = None) -> Query | None:
    """Predict event `t` of `s` from its events before `end` (default t), without the target
    platform's events when `cold`; None when that input is empty."""
    keep = np.arange(t if end is None else end)
    if cold:
        keep = keep[s.platforms[keep] != s.platforms[t]]
    if not len(keep):
        return None
    return Query(s.user_id, s.items[keep], s.actions[keep], s.weights[keep],
                 data.names[int(s.platforms[t])], int(s.items[t]))


def last_on_platform_queries(data: RankData, s: ud.UserSeq, cold: bool) -> list[Query]:
    """Leave-last-out per platform: target = the user's last event on each platform (all
    rows, history and held-out targets), input = every earlier event (protocol A)."""
    out = []
    for pid in sorted(set(s.platforms.tolist())):
        t = int(np.flatnonzero(s.platforms == pid)[-1])
        q = seq_query(data, s, t, cold)
        if q is not None:
            out.append(q)
    return out


def query_window(data: RankData, q: Query, max_events: int) -> Window:
    """The query's last `max_events` input events as a fusion Window (oldest first)."""
    rows = q.rows[-max_events:]
    acts, wts = q.actions[-max_events:], q.weights[-max_events:]
    events = [Event(f"{q.user_id}:{i}", q.user_id, data.ids[r][0], int(a), data.ids[r][1], "",
                    i, float(w)) for i, (r, a, w) in enumerate(zip(rows, acts, wts))]
    return Window(events, data.vecs[rows])


def user_context(model, data: RankData, q: Query) -> UserContext:
    """The ranker's view of the query's user, as the serving side gets it from fusion: the
    input's last max_events as one window through recmodel.user_model.encode_user (the
    layout fusion serves), counts = events per platform in the whole input, history = the
    window newest first."""
    w = query_window(data, q, model.max_events)
    user = encode_user(model, w, q.target_platform)
    plats, n = np.unique([data.ids[r][0] for r in q.rows], return_counts=True)
    return UserContext(q.target_platform, user.for_platform, user.fused, user.per_platform,
                       dict(zip(plats.tolist(), n.tolist())),
                       [(e.platform, e.item_id) for e in reversed(w.events)],
                       np.ascontiguousarray(w.vectors[::-1]))


def user_contexts(model, data: RankData, queries: list[Query]) -> list[UserContext]:
    return [user_context(model, data, q) for q in queries]


def local_row(data: RankData, q: Query) -> int:
    """The query target's row in its platform's table (-1: unknown)."""
    return data.local.get(q.target_row, -1)
