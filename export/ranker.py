"""Ranker: trains the candidate re-ranker on Amazon Arts/Office and exports it to ONNX.

Candidates, features and scores come from services/ranking/pipeline.py, the code serving runs:
per (user, target platform) query, the platform's top CANDIDATES items by dot(for_platform user
vector, item vector), the last COVISIT_CANDIDATES replaced by co-visit items, scored by the
ranker from candidate_features and re-ordered. Training examples come from training users
only (export.user_data's seeded user split, the user tower's): next-item positions on each
platform, half of them with the target platform's events removed from the input (cold
platform); listwise softmax cross-entropy over the candidates of the examples whose target
was retrieved.

    python -m export.ranker --model-repo models [--seed 0]

ONNX contract (models/ranker/<N>/model.onnx; B and N dynamic):
  input  features float32 [B, N, F]  raw candidate_features rows (F = len(FEATURES)), candidates
                                     in retrieval order; standardisation is inside the model
  output scores   float32 [B, N]     higher is better; a candidate's score does not depend on
                                     the other candidates (no cross-candidate terms)
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import platform as _platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clients.datasets import AMAZON
from export import user_data as ud
from services.common.events import Event
from services.common.modelrepo import new_version, resolve, versions, write_meta
from services.fusion.model import BaselineUserModel, OnnxUserModel, Window, encode_user
from services.ranking import pipeline
from services.ranking.covisit import COVISIT_FILE, CoVisits
from services.ranking.features import FEATURES, N_FEATURES, UserContext, popularity_features
from services.ranking.catalog import HNSW_THRESHOLD, index_kind
from services.ranking.index import PCA, PCA_SHORTLIST, PlatformIndex, top_rows
from services.ranking.pipeline import ItemTable

log = logging.getLogger("export.ranker")

MODEL_NAME = "ranker"
USER_TOWER = "user_tower"
# Candidates the ranker re-orders per query. Serving uses the same numbers (meta.json
# "candidates", "covisit_candidates"): retrieval_pct = position / N is a
# feature, so another N shifts that feature's scale. 1000 rather than 200: the tower's top 200
# hold the target for 16% (warm) / 8% (cold platform) of validation queries, its top 1000 for
# 32% / 19%; re-ranked NDCG@10 warm .0461 -> .0489 (cold flat), at ~5x the feature work.
CANDIDATES = 1000
# Of the CANDIDATES, up to this many come from co-visitation (items the training users who
# shared the user's items also had, services/ranking/covisit.py) in place of the dot
# product's last ones: the validation targets inside the candidates rise from 31.9% to 34.1%
# (warm) and 19.4% to 20.0% (cold platform) at the same N.
COVISIT_CANDIDATES = 200
# Retrieval (services/ranking/index.py, kind pca) scans the item vectors projected onto their
# RETRIEVAL_DIMS top principal directions, computed here over the catalogue, written beside
# the ranker so serving and evaluation project alike: 96 of 384 dimensions keep 99.7% of the
# exact top-1000 (item-vector queries) in a 2,000-row shortlist re-scored exactly; the end
# NDCG@10 of each index kind is in bench/results/recommend.json.
RETRIEVAL_DIMS = 96
RETRIEVAL_FILE = "retrieval.npz"
INPUT_NAME, OUTPUT_NAME = "features", "scores"
OPSET = 17
PARITY_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------- data

@dataclass
class RankData:
    """The catalogue, its item vectors, every user's sequence and the user split."""
    dataset: str
    ids: list[tuple[str, str]]         # catalogue rows: (platform, item_id)
    vecs: np.ndarray                   # float32 [n_items, dim], L2-normalised
    encoder: dict                      # {"name", "version"} of the item vectors
    vocab: dict[str, int]              # platform vocabulary (the user tower's construction)
    seqs: list[ud.UserSeq]             # every user, sorted by user id
    train_ids: set[str]
    val_ids: set[str]
    counts: np.ndarray                 # float64 [n_items] events per item, training users
    row_of: dict[tuple[str, str], int] = field(default_factory=dict)
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
        if self.covisit is None:
            self.covisit = CoVisits.from_users(
                self.ids, [s.items for s in self.seqs if s.user_id in self.train_ids])
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
    """Item vectors (export.item_vectors cache), sequences and the user tower's user split."""
    from export.item_vectors import ENCODER_NAME, encoder_ref, item_vectors

    _, enc_version, _ = encoder_ref(repo, encoder_version)
    ids, vecs = item_vectors(dataset, repo, enc_version)
    users, missing = ud.load_sequences(dataset, ids)
    if missing:
        log.warning("%d events dropped: item not in the catalogue", missing)
    train_ids, val_ids = ud.split_users([u["user_id"] for u in users])
    vocab = ud.platform_vocab([u for u in users if u["user_id"] in train_ids])
    seqs = [ud.to_seq(u, vocab) for u in users]
    counts = np.zeros(len(ids), np.float64)
    for s in seqs:
        if s.user_id in train_ids:
            np.add.at(counts, s.items, 1.0)
    return RankData(dataset, ids, vecs, {"name": ENCODER_NAME, "version": enc_version},
                    vocab, seqs, train_ids, val_ids, counts)


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


# ---------------------------------------------------------------------------- queries

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


def _window(data: RankData, q: Query, max_events: int) -> Window:
    rows = q.rows[-max_events:]
    acts, wts = q.actions[-max_events:], q.weights[-max_events:]
    events = [Event(f"{q.user_id}:{i}", q.user_id, data.ids[r][0], int(a), data.ids[r][1], "",
                    i, float(w)) for i, (r, a, w) in enumerate(zip(rows, acts, wts))]
    return Window(events, data.vecs[rows])


def user_context(model, data: RankData, q: Query) -> UserContext:
    """The ranker's view of the query's user, as the serving side gets it from fusion: the
    input's last max_events as one window through services.fusion.model.encode_user (the
    layout fusion serves), counts = events per platform in the whole input, history = the
    window newest first."""
    w = _window(data, q, model.max_events)
    user = encode_user(model, w, q.target_platform)
    plats, n = np.unique([data.ids[r][0] for r in q.rows], return_counts=True)
    return UserContext(q.target_platform, user.for_platform, user.fused, user.per_platform,
                       dict(zip(plats.tolist(), n.tolist())),
                       [(e.platform, e.item_id) for e in reversed(w.events)],
                       np.ascontiguousarray(w.vectors[::-1]))


def user_contexts(model, data: RankData, queries: list[Query]) -> list[UserContext]:
    return [user_context(model, data, q) for q in queries]


# ---------------------------------------------------------------------------- retrieval

def top_and_rank(scores: np.ndarray, k: int, target_local: np.ndarray | None = None):
    """Order of each row of scores float [q, m] by score, ties broken by column (catalogue
    order): (top int64 [q, k] columns, best first; 1-based full rank of target_local[q] in
    that order, or None)."""
    q, m = scores.shape
    k = min(k, m)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, part, 1).min(1)
    top = np.zeros((q, k), np.int64)
    for r in range(q):
        idx = np.flatnonzero(scores[r] >= kth[r])
        top[r] = idx[np.lexsort((idx, -scores[r, idx]))][:k]
    ranks = None
    if target_local is not None:
        ranks = full_ranks(scores, target_local)
    return top, ranks


def full_ranks(scores: np.ndarray, target_local: np.ndarray) -> np.ndarray:
    """1-based rank of column target_local[q] in each row of scores [q, m] (ties by column)."""
    st = scores[np.arange(len(scores)), target_local][:, None]
    cols = np.arange(scores.shape[1])[None, :]
    return (1 + (scores > st).sum(1)
            + ((scores == st) & (cols < target_local[:, None])).sum(1))


def batch_retrieve(data: RankData, user_vecs: np.ndarray, platforms: list[str],
                   n: int = CANDIDATES, chunk: int = 256) -> np.ndarray:
    """Training's retrieval: each query platform's top-n table rows by dot(user, item), ties
    by row, as the table's index (services/ranking/index.py) finds them one query at a time
    (exact, or pca's shortlist re-scored exactly), here a matmul per chunk of queries:
    int64 [Q, n]."""
    top = np.zeros((len(platforms), n), np.int64)
    plats = np.asarray(platforms)
    for p, table in data.tables.items():
        sel = np.flatnonzero(plats == p)
        snap = table.snapshot
        for c0 in range(0, len(sel), chunk):
            qs = sel[c0:c0 + chunk]
            if snap.kind != PCA:
                top[qs], _ = top_and_rank(user_vecs[qs] @ table.vectors.T, n)
                continue
            short, _ = top_and_rank((user_vecs[qs] @ snap.projection) @ snap.projected.T,
                                    PCA_SHORTLIST * n)
            for j, q in enumerate(qs):
                rows = np.sort(short[j])
                top[q] = rows[top_rows(table.vectors[rows] @ user_vecs[q], n)]
    return top


def candidate_ranks(data: RankData, ctx: UserContext, cand_rows: np.ndarray,
                    target_row: int) -> int:
    """The target's 1-based rank before re-ranking: its candidate position, or below the
    candidates, n + its rank by dot product among the rest (table rows; ties by row)."""
    hit = np.flatnonzero(cand_rows == target_row)
    if len(hit):
        return int(hit[0]) + 1
    table = data.tables[ctx.target_platform]
    scores = table.vectors @ ctx.for_platform
    scores[cand_rows] = -np.inf
    return len(cand_rows) + int(full_ranks(scores[None], np.array([target_row]))[0])


def local_row(data: RankData, q: Query) -> int:
    """The query target's row in its platform's table (-1: unknown)."""
    return data.local.get(q.target_row, -1)


def query_features(model, data: RankData, queries: list[Query], n: int = CANDIDATES,
                   covisit: int = COVISIT_CANDIDATES):
    """(features float32 [Q, n, F], candidate table rows int64 [Q, n], target's rank before
    re-ranking int64 [Q]) for queries with known targets: the serving pipeline, query by
    query (services/ranking/pipeline.py)."""
    feats, cands, ranks = [], [], []
    for q in queries:
        ctx = user_context(model, data, q)
        table = data.tables[q.target_platform]
        c = pipeline.candidates(ctx, table, data.covisit, n, covisit)
        feats.append(pipeline.features(ctx, table, c, data.covisit))
        cands.append(c.rows)
        ranks.append(candidate_ranks(data, ctx, c.rows, local_row(data, q)))
    return np.stack(feats), np.stack(cands), np.array(ranks, np.int64)


# ---------------------------------------------------------------------------- training data

@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    candidates: int = CANDIDATES
    covisit_candidates: int = COVISIT_CANDIDATES
    positions_per_user: int = 6    # sampled next-item positions per training user
    # ...plus each platform's last event, the position the evaluation (and a backend asking
    # "what next") predicts: validation NDCG@10 warm .0684 -> .0717, cold .0179 -> .0188.
    last_per_platform: bool = True
    cold_fraction: float = 0.5     # of those, the share made cold-platform examples
    dev_fraction: float = 0.1      # training users kept for early stopping (never val users)
    hidden: tuple[int, ...] = (64, 32)
    # A fixed number of epochs (the dev-best kept), not a time budget: the model must not
    # depend on how busy the export machine was.
    epochs: int = 6
    batch: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 3
    max_train_s: float = 1800.0  # a safety stop only


def training_queries(data: RankData, users: list[ud.UserSeq], cfg: TrainConfig,
                     rng: np.random.Generator) -> list[Query]:
    """Sampled next-item positions of `users` (every position t >= 1 of the whole sequence is
    a candidate, and with last_per_platform each platform's last event is added); each
    becomes a cold-platform example with probability cold_fraction (when the user has
    earlier events on another platform), else a warm one."""
    out = []
    for s in users:
        positions = np.arange(1, len(s.items))
        take = rng.choice(positions, size=min(cfg.positions_per_user, len(positions)),
                          replace=False)
        if cfg.last_per_platform:
            last = [int(np.flatnonzero(s.platforms == p)[-1]) for p in set(s.platforms.tolist())]
            take = np.union1d(take, [t for t in last if t >= 1])
        for t in sorted(take.tolist()):
            cold = rng.random() < cfg.cold_fraction
            q = seq_query(data, s, t, cold) if cold else None
            out.append(q if q is not None else seq_query(data, s, t, False))
    return out


def leave_user_out_popularity(data: RankData, s: ud.UserSeq) -> dict[str, tuple]:
    """Per platform, (log_pop, pop_pct) float32 [table rows] of training counts without user
    `s`'s own events: a validation user's events are not in the counts either, so a target's
    popularity is not inflated by the very event being predicted."""
    counts = data.counts.copy()
    if s.user_id in data.train_ids:
        np.subtract.at(counts, s.items, 1.0)
    return {p: popularity_features(counts[rows]) for p, rows in data.catalogue.items()}


def build_examples(model, data: RankData, users: list[ud.UserSeq], cfg: TrainConfig,
                   rng: np.random.Generator, chunk_users: int = 400, label: str = "train"):
    """(features float32 [M, N, F], target position int64 [M], stats) of the sampled queries
    whose target is among the CANDIDATES retrieved: serving's pipeline.candidates and
    pipeline.features, with training's batched exact retrieval, each training user left out
    of the co-visit counts and the popularity."""
    xs, ys = [], []
    n_queries = n_cold = n_kept = n_kept_cold = 0
    start = time.monotonic()
    for u0 in range(0, len(users), chunk_users):
        part = users[u0:u0 + chunk_users]
        queries = training_queries(data, part, cfg, rng)
        ctxs = user_contexts(model, data, queries)
        dense = batch_retrieve(data, np.stack([c.for_platform for c in ctxs]),
                               [q.target_platform for q in queries], cfg.candidates)
        own_of = {s.user_id: s.items if s.user_id in data.train_ids else None for s in part}
        pops = {s.user_id: leave_user_out_popularity(data, s) for s in part}
        for q, ctx, rows in zip(queries, ctxs, dense):
            cold = q.target_platform not in ctx.per_platform
            n_queries += 1
            n_cold += cold
            table = data.tables[q.target_platform]
            c = pipeline.candidates(ctx, table, data.covisit, cfg.candidates,
                                    cfg.covisit_candidates, retrieve=lambda *_, r=rows: r,
                                    own_rows=own_of[q.user_id])
            hit = np.flatnonzero(c.rows == local_row(data, q))
            if not len(hit):
                continue
            n_kept += 1
            n_kept_cold += cold
            xs.append(pipeline.features(ctx, table, c, data.covisit,
                                        pops[q.user_id][q.target_platform]))
            ys.append(int(hit[0]))
        log.info("%s examples: %d/%d users, %d queries (%d cold), %d kept (target in top-%d)"
                 ", %.0fs", label, min(u0 + chunk_users, len(users)), len(users), n_queries,
                 n_cold, n_kept, cfg.candidates, time.monotonic() - start)
    stats = {"queries": n_queries, "cold_queries": n_cold, "kept": n_kept,
             "kept_cold": n_kept_cold, "candidates": cfg.candidates,
             "candidate_recall": n_kept / max(n_queries, 1),
             "candidate_recall_warm": (n_kept - n_kept_cold) / max(n_queries - n_cold, 1),
             "candidate_recall_cold": n_kept_cold / max(n_cold, 1)}
    return np.stack(xs), np.array(ys, np.int64), stats


# ---------------------------------------------------------------------------- model

def _torch():
    import torch
    return torch


def make_ranker(mean: np.ndarray, std: np.ndarray, hidden=(64, 32)):
    """MLP over standardised features plus a linear skip; mean/std are buffers so serving
    feeds raw features."""
    torch = _torch()
    nn = torch.nn

    class Ranker(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
            layers, width = [], len(mean)
            for h in hidden:
                layers += [nn.Linear(width, h), nn.GELU()]
                width = h
            layers.append(nn.Linear(width, 1))
            self.mlp = nn.Sequential(*layers)
            self.skip = nn.Linear(len(mean), 1, bias=False)

        def forward(self, features):
            x = (features - self.mean) / self.std
            return (self.mlp(x) + self.skip(x)).squeeze(-1)

    return Ranker()


def feature_norm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over every candidate of `x` [M, N, F]; std 1 where constant."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def ndcg_of_positions(scores: np.ndarray, y: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(NDCG@k, HR@k) of the target positions y under scores [M, N] (ties against target)."""
    st = scores[np.arange(len(y)), y][:, None]
    rank = (scores > st).sum(1) + 1
    hit = rank <= k
    return float(np.where(hit, 1 / np.log2(rank + 1), 0).mean()), float(hit.mean())


def train_ranker(x: np.ndarray, y: np.ndarray, x_dev: np.ndarray, y_dev: np.ndarray,
                 cfg: TrainConfig):
    """Listwise softmax cross-entropy over candidates; returns (best-on-dev model, history)."""
    torch = _torch()
    F = torch.nn.functional
    torch.manual_seed(cfg.seed)
    mean, std = feature_norm(x)
    model = make_ranker(mean, std, cfg.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(x) / cfg.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    xd = torch.from_numpy(x_dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    history, best, best_state, bad = [], -1.0, None, 0
    start = time.monotonic()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for b0 in tqdm(range(0, len(x), cfg.batch), desc=f"epoch {epoch}/{cfg.epochs}",
                       unit="batch", leave=False, disable=None):
            idx = perm[b0:b0 + cfg.batch]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            dev_scores = model(xd).numpy()
        dev_loss = float(F.cross_entropy(torch.from_numpy(dev_scores), torch.from_numpy(y_dev)))
        ndcg, hr = ndcg_of_positions(dev_scores, y_dev)
        elapsed = time.monotonic() - start
        history.append({"epoch": epoch, "train_loss": total / len(x), "dev_loss": dev_loss,
                        "dev_ndcg@10": ndcg, "dev_hr@10": hr, "elapsed_s": round(elapsed, 1)})
        log.info("epoch %2d  train loss %.4f  dev loss %.4f  dev NDCG@10 %.4f HR@10 %.4f  %.0fs",
                 epoch, total / len(x), dev_loss, ndcg, hr, elapsed)
        if ndcg > best:
            best, bad = ndcg, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        if bad >= cfg.patience or elapsed > cfg.max_train_s:
            break
    model.load_state_dict(best_state)
    model.eval()
    return model, history


# ---------------------------------------------------------------------------- export

def export_onnx(model, path: Path, n_features: int = N_FEATURES) -> None:
    torch = _torch()
    sample = torch.zeros(2, 7, n_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (sample,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch", 1: "candidates"},
                                        OUTPUT_NAME: {0: "batch", 1: "candidates"}},
                          do_constant_folding=True)


def ort_session(path: str | os.PathLike, threads: int = 2):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_scores(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """scores float32 [B, N] of features float32 [B, N, F]."""
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(
        x[b0:b0 + batch], dtype=np.float32)})[0] for b0 in range(0, len(x), batch)])


def check_parity(model, path: Path, feature_sets: list[np.ndarray]) -> dict:
    """Max abs diff of onnxruntime vs torch scores; raises over PARITY_TOLERANCE."""
    torch = _torch()
    session = ort_session(path)
    worst, n = 0.0, 0
    for x in feature_sets:
        with torch.no_grad():
            ref = model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        worst = max(worst, float(np.abs(ort_scores(session, x) - ref).max()))
        n += len(x)
    result = {"max_abs_diff": worst, "tolerance": PARITY_TOLERANCE, "n_lists": n,
              "shapes": sorted({tuple(x.shape) for x in feature_sets})}
    if not worst <= PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX parity failed: max abs diff {worst:.3g} > "
                           f"{PARITY_TOLERANCE:g}")
    return result


def io_meta(n_candidates: int = CANDIDATES, covisit: int = 0, history_events: int = 50
            ) -> dict:
    return {
        "format": "onnx", "opset": OPSET, "model_file": "model.onnx",
        "input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME],
        "inputs": {INPUT_NAME: {"dtype": "float32",
                                "shape": ["batch", "candidates", N_FEATURES]}},
        "outputs": {OUTPUT_NAME: {"dtype": "float32", "shape": ["batch", "candidates"]}},
        "features": list(FEATURES), "n_features": N_FEATURES, "candidates": n_candidates,
        "covisit_candidates": covisit, "covisit_file": COVISIT_FILE,
        "retrieval_file": RETRIEVAL_FILE,
        "history_events": history_events,
        "candidate_rule": "services.ranking.pipeline.candidates: the target platform's best "
                          "`candidates` items by dot(for_platform user vector, item vector) "
                          "(ties by catalogue row), up to covisit_candidates of the last "
                          "replaced by co-visit items of the user's newest history_events "
                          "events; retrieval_pct = position in that list / candidates",
        "feature_function": "services.ranking.pipeline.features (raw, unscaled: "
                            "standardisation is inside the model)",
        "score": "higher is better; sort candidates by score descending",
    }


def write_version(repo: str | os.PathLike, model, meta: dict, parity_sets: list[np.ndarray],
                  projection: np.ndarray, eval_fn=None, covisit: CoVisits | None = None,
                  history_events: int = 50) -> tuple[Path, dict]:
    """Export, gate on parity, write models/ranker/<N>/ (model.onnx, covisit.npz,
    retrieval.npz, meta.json last). Nothing is written unless parity holds."""
    with new_version(repo, MODEL_NAME) as (tmp, version):
        onnx_path = tmp / "model.onnx"
        export_onnx(model, onnx_path)
        parity = check_parity(model, onnx_path, parity_sets)
        log.info("parity: max abs diff %.2e over %d lists (tolerance %g)",
                 parity["max_abs_diff"], parity["n_lists"], PARITY_TOLERANCE)
        cfg = meta.get("train_config", {})
        meta = dict(meta, **io_meta(cfg.get("candidates", CANDIDATES),
                                    cfg.get("covisit_candidates", 0), history_events),
                    name=MODEL_NAME, version=version, parity=parity)
        if covisit is not None:
            covisit.save(tmp / COVISIT_FILE)
        np.savez(tmp / RETRIEVAL_FILE, projection=projection)
        if eval_fn is not None:
            meta = eval_fn(onnx_path, meta)
        write_meta(tmp, meta)
    return Path(repo) / MODEL_NAME / str(version), meta


# ---------------------------------------------------------------------------- validation

def rerank_ranks(scores: np.ndarray, retrieval_ranks: np.ndarray, cands: np.ndarray,
                 targets: np.ndarray) -> np.ndarray:
    """Full rank after re-ranking the top-N candidates by `scores` [Q, N]: a target among them
    takes its position in the new order (ties broken by retrieval order); one below keeps
    its retrieval rank."""
    out = retrieval_ranks.copy()
    for i in range(len(targets)):
        hit = np.flatnonzero(cands[i] == targets[i])
        if len(hit):
            j = hit[0]
            s = scores[i]
            out[i] = 1 + (s > s[j]).sum() + (s[:j] == s[j]).sum()
    return out


def validation_metrics(session, model, data: RankData, n: int = CANDIDATES,
                       covisit: int = COVISIT_CANDIDATES) -> dict:
    """Protocol A (last event per platform, full catalogue) on the validation users:
    retrieval order vs re-ranked, warm and cold platform."""
    val = [s for s in data.seqs if s.user_id in data.val_ids]
    out = {}
    for setting, cold in (("warm", False), ("cold", True)):
        queries = [q for s in val for q in last_on_platform_queries(data, s, cold)]
        feats, cands, ranks = query_features(model, data, queries, n, covisit)
        targets = np.array([local_row(data, q) for q in queries])
        reranked = rerank_ranks(ort_scores(session, feats), ranks, cands, targets)
        out[setting] = {
            "retrieval": ud.metrics_from_ranks(ranks),
            "reranked": ud.metrics_from_ranks(reranked),
            "candidate_recall": float((ranks <= n).mean()), "candidates": n,
            "covisit_candidates": covisit,
        }
        log.info("validation %s (%d queries): retrieval NDCG@10 %.4f -> re-ranked %.4f "
                 "(HR@10 %.4f -> %.4f), candidate recall@%d %.3f", setting, len(queries),
                 out[setting]["retrieval"]["ndcg@10"], out[setting]["reranked"]["ndcg@10"],
                 out[setting]["retrieval"]["recall@10"], out[setting]["reranked"]["recall@10"],
                 n, out[setting]["candidate_recall"])
    return out


# ---------------------------------------------------------------------------- main

def run(cfg: TrainConfig, repo: str | os.PathLike, dataset: str = AMAZON,
        user_tower_version: int | None = None, allow_baseline: bool = False):
    torch = _torch()
    t0 = time.monotonic()
    data = load_data(repo, dataset)
    model = load_user_model(repo, user_tower_version, allow_baseline)
    if not model.baseline and model.meta.get("split", {}).get("val_users") not in (
            None, len(data.val_ids)):
        raise RuntimeError("user split differs from the user tower's: "
                           f"{model.meta['split']} vs {len(data.val_ids)} validation users")
    rng = np.random.default_rng(cfg.seed)
    train = [s for s in data.seqs if s.user_id in data.train_ids]
    dev_n = round(cfg.dev_fraction * len(train))
    order = rng.permutation(len(train))
    dev = [train[i] for i in sorted(order[:dev_n])]
    fit = [train[i] for i in sorted(order[dev_n:])]
    log.info("%d training users (%d fit, %d dev), %d validation users untouched; user model "
             "%s v%s; data ready in %.0fs", len(train), len(fit), len(dev), len(data.val_ids),
             model.name, model.version, time.monotonic() - t0)
    t1 = time.monotonic()
    x, y, stats = build_examples(model, data, fit, cfg, rng, label="fit")
    x_dev, y_dev, dev_stats = build_examples(model, data, dev, cfg, rng, label="dev")
    examples_s = time.monotonic() - t1
    log.info("examples: fit %s, dev %s, %.0fs", x.shape, x_dev.shape, examples_s)
    t2 = time.monotonic()
    ranker, history = train_ranker(x, y, x_dev, y_dev, cfg)
    train_s = time.monotonic() - t2
    n_params = sum(p.numel() for p in ranker.parameters())
    with torch.no_grad():
        dev_retrieval = ndcg_of_positions(-np.arange(cfg.candidates, dtype=np.float32)[None]
                                          .repeat(len(y_dev), 0), y_dev)

    val = [s for s in data.seqs if s.user_id in data.val_ids]
    parity_queries = [q for s in val[:64] for q in last_on_platform_queries(data, s, False)]
    pf, _, _ = query_features(model, data, parity_queries, cfg.candidates,
                              cfg.covisit_candidates)
    parity_sets = [pf, pf[:5, :37], x_dev[:64]]

    def eval_fn(onnx_path: Path, meta: dict) -> dict:
        meta["validation"] = validation_metrics(ort_session(onnx_path), model, data,
                                                cfg.candidates,
                                                cfg.covisit_candidates)
        return meta

    meta = {
        "dataset": dataset,
        "user_tower": {"name": model.name, "version": model.version,
                       "baseline": bool(model.baseline)},
        "encoder": data.encoder,
        "popularity": "item event counts of the training users (served: fusion's); each "
                      "training example's own user is left out of them",
        "covisit": f"{COVISIT_FILE}: pairs of items the same training user had (user-level, "
                   f"repeats once), {len(data.covisit)} items, "
                   f"{len(data.covisit.indices)} non-zeros; each training example's own user "
                   "is left out of them",
        "split": {"rule": "export.user_data.split_users (the user tower's)",
                  "train_users": len(train), "val_users": len(data.val_ids),
                  "fit_users": len(fit), "dev_users": len(dev),
                  "dev_rule": f"seeded {cfg.dev_fraction} of training users (early stopping)"},
        "examples": {"fit": stats, "dev": dev_stats, "build_s": round(examples_s, 1)},
        "seed": cfg.seed, "train_config": asdict(cfg), "n_params": n_params,
        "training": {"train_s": round(train_s, 1), "history": history,
                     "best_dev_ndcg@10": max(h["dev_ndcg@10"] for h in history),
                     "dev_retrieval_order_ndcg@10": dev_retrieval[0]},
        "history_window": "the user tower's max_events newest input events, newest first",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "exporter": {"torch": torch.__version__, "python": _platform.python_version(),
                     "threads": torch.get_num_threads()},
    }
    path, meta = write_version(repo, ranker, meta, parity_sets, data.projection, eval_fn,
                               data.covisit, model.max_events)
    log.info("wrote %s (%d params, total %.0fs)", path, n_params, time.monotonic() - t0)
    return path, meta


def limit_blas_threads(n: int = 1) -> None:
    """Small matmuls (200 candidates x 384) run many times slower with several OpenBLAS
    threads on a busy machine; ONNX Runtime keeps its own thread pool."""
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n, user_api="blas")
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repo", default=os.environ.get("CROSSREC_MODEL_REPO", "models"))
    parser.add_argument("--dataset", default=AMAZON)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--user-tower-version", type=int, default=None)
    parser.add_argument("--positions-per-user", type=int, default=TrainConfig.positions_per_user)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--candidates", type=int, default=CANDIDATES,
                        help="candidates re-ranked per query (serving must use the same)")
    parser.add_argument("--covisit-candidates", type=int, default=COVISIT_CANDIDATES,
                        help="of those, up to this many from co-visitation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allow-baseline", action="store_true",
                        help="train on the untrained baseline user model when no user tower "
                             "is exported (development only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    _torch().set_num_threads(args.threads)
    limit_blas_threads()
    cfg = TrainConfig(seed=args.seed, positions_per_user=args.positions_per_user,
                      epochs=args.epochs, candidates=args.candidates,
                      covisit_candidates=args.covisit_candidates)
    run(cfg, args.model_repo, args.dataset, args.user_tower_version, args.allow_baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
