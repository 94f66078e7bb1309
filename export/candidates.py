"""Candidates as training and evaluation build them: scores ordered with ties by catalogue row
(top_and_rank, full_ranks), training's batched retrieval, a target's rank before re-ranking,
and per query the serving pipeline's candidates and features (recmodel/pipeline.py).
Torch-free."""

from __future__ import annotations

import numpy as np

from export.rank_data import Query, RankData, local_row, user_context
from recmodel import pipeline
from recmodel.features import UserContext
from recmodel.index import PCA, PCA_SHORTLIST, top_rows

# Candidates the ranker re-orders per query. Serving uses the same numbers (meta.json
# "candidates", "covisit_candidates"): retrieval_pct = position / N is a feature, so another N
# shifts that feature's scale. 1000 rather than 200: about twice the validation targets reach
# the ranker, for ~5x the feature work (figures: bench/results/export-decisions.md).
CANDIDATES = 1000
# Of the CANDIDATES, up to this many come from co-visitation (items the training users who
# shared the user's items also had, recmodel/covisit.py) in place of the dot
# product's last ones: more validation targets inside the same N (bench/results/
# export-decisions.md).
COVISIT_CANDIDATES = 200


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
    by row, as the table's index (recmodel/index.py) finds them one query at a time
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



def query_features(model, data: RankData, queries: list[Query], n: int = CANDIDATES,
                   covisit: int = COVISIT_CANDIDATES):
    """(features float32 [Q, n, F], candidate table rows int64 [Q, n], target's rank before
    re-ranking int64 [Q]) for queries with known targets: the serving pipeline, query by
    query (recmodel/pipeline.py)."""
    feats, cands, ranks = [], [], []
    for q in queries:
        ctx = user_context(model, data, q)
        table = data.tables[q.target_platform]
        c = pipeline.candidates(ctx, table, data.covisit, n, covisit)
        feats.append(pipeline.features(ctx, table, c, data.covisit))
        cands.append(c.rows)
        ranks.append(candidate_ranks(data, ctx, c.rows, local_row(data, q)))
    return np.stack(feats), np.stack(cands), np.array(ranks, np.int64)
