"""Ranking metrics, defined once for training, validation and the offline evaluation: the
1-based rank of each true target, and HR (= recall, one target), NDCG, MRR, coverage, novelty
and intra-list diversity computed from ranks and top lists. Numpy only."""

from __future__ import annotations

import numpy as np

K = 10


# ---------------------------------------------------------------------------- from ranks

def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Share of cases whose target's 1-based rank is <= k (np.inf: not ranked)."""
    return float((np.asarray(ranks, float) <= k).mean())


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item: 1/log2(rank + 1) when rank <= k, else 0."""
    r = np.asarray(ranks, float)
    return float(np.where(r <= k, 1.0 / np.log2(np.minimum(r, 1e12) + 1.0), 0.0).mean())


def mrr(ranks: np.ndarray) -> float:
    return float((1.0 / np.asarray(ranks, float)).mean())


def metrics_from_ranks(ranks: np.ndarray, k: int = K) -> dict:
    """Recall@k (one target per query, so = HR@k), NDCG@k and MRR, averaged over queries."""
    return {f"recall@{k}": hit_rate(ranks, k), f"ndcg@{k}": ndcg(ranks, k), "mrr": mrr(ranks),
            "n": int(len(ranks))}


def ndcg_of_positions(scores: np.ndarray, y: np.ndarray, k: int = K) -> tuple[float, float]:
    """(NDCG@k, HR@k) of the target positions y under scores [M, N] (ties against target)."""
    st = scores[np.arange(len(y)), y][:, None]
    rank = (scores > st).sum(1) + 1
    return ndcg(rank, k), hit_rate(rank, k)


# ---------------------------------------------------------------------------- ranks

def rank_of_targets(user_vecs: np.ndarray, w, item_vecs: np.ndarray,
                    catalogue: dict[int, np.ndarray], item_bias: np.ndarray | None = None,
                    scale: float = 1.0, chunk: int = 512) -> np.ndarray:
    """1-based rank of each target of windows `w` (export.user_data.Windows) among its
    platform's whole catalogue by scale * dot(user, item) (+ item_bias[item], float [n_items],
    when given).

    Ties count against the target (an item with the same score ranks above it), so identical
    item texts cannot make a ranking look better than it is."""
    ranks = np.zeros(len(w), dtype=np.int64)
    for pid, rows in catalogue.items():
        sel = np.flatnonzero(w.target_platform == pid)
        mat = item_vecs[rows]
        for c0 in range(0, len(sel), chunk):
            q = sel[c0:c0 + chunk]
            scores = scale * (user_vecs[q] @ mat.T)
            target = scale * np.einsum("qd,qd->q", user_vecs[q], item_vecs[w.target_item[q]])
            if item_bias is not None:
                scores = scores + item_bias[rows][None, :]
                target = target + item_bias[w.target_item[q]]
            # The target itself is among the >= (1e-5 absorbs matmul vs einsum rounding).
            ranks[q] = np.maximum((scores >= target[:, None] - 1e-5 * max(scale, 1.0)).sum(1), 1)
    return ranks


def rank_by_score(scores_by_platform: dict[int, np.ndarray], w,
                  catalogue: dict[int, np.ndarray]) -> np.ndarray:
    """1-based rank of each target of windows `w` under a user-independent score per
    catalogue row (e.g. popularity); ties are broken by catalogue order, deterministically."""
    ranks = np.zeros(len(w), dtype=np.int64)
    for pid, rows in catalogue.items():
        order = np.lexsort((np.arange(len(rows)), -scores_by_platform[pid]))
        position = np.empty(len(rows), dtype=np.int64)
        position[order] = np.arange(1, len(rows) + 1)
        local = {int(r): i for i, r in enumerate(rows)}
        for q in np.flatnonzero(w.target_platform == pid):
            ranks[q] = position[local[int(w.target_item[q])]]
    return ranks


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


def ranks_from_lists(tops: list[list[str]], targets: list[str]) -> np.ndarray:
    """1-based rank of each target in its list; np.inf when absent."""
    return np.array([t.index(g) + 1 if g in t else np.inf for t, g in zip(tops, targets)])


# ---------------------------------------------------------------------------- from top lists

def coverage(tops: list[list], catalogue_size: int, k: int = K) -> float:
    """Distinct items in the top-k lists over all cases / catalogue size."""
    return len({i for t in tops for i in t[:k]}) / catalogue_size


def novelty(tops: list[list], share, k: int = K) -> float:
    """Mean -log2(popularity share) of the recommended top-k items; share(item) in (0, 1]."""
    vals = [-np.log2(share(i)) for t in tops for i in t[:k]]
    return float(np.mean(vals)) if vals else 0.0


def intra_list_diversity(top_vectors: list[np.ndarray]) -> float:
    """Mean over lists of the mean pairwise (1 - cosine) of a list's item vectors [k, dim]."""
    vals = []
    for v in top_vectors:
        n = len(v)
        if n < 2:
            continue
        u = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        sims = u @ u.T
        vals.append(float((1.0 - sims[~np.eye(n, dtype=bool)]).mean()))
    return float(np.mean(vals)) if vals else 0.0
