"""Ranker features: one definition shared by serving (ranking engine) and training (export).

For one request the ranker sees the user (vectors from fusion, recent history with item
vectors, event counts per platform) and N candidates of the target platform (item vectors,
popularity, retrieval order, co-visit counts with the user's items: recmodel/covisit.py),
and scores each candidate from FEATURES below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FEATURES = (
    "sim_target",        # candidate . user as seen by the target platform (for_platform vector)
    "sim_fused",         # candidate . user fused over all platforms
    "sim_same",          # candidate . user from the target platform's events alone (0 if none)
    "has_same",          # 1 if the user has history on the target platform
    "sim_other",         # max over other platforms p of candidate . user from p alone
    "has_other",         # 1 if the user has history on another platform
    "max_hist_same",     # max cosine to a recent history item on the target platform
    "max_hist_other",    # max cosine to a recent history item on another platform
    "mean_hist_recent",  # mean cosine to the 5 newest history items (any platform)
    "log_pop",           # log1p(events on the candidate, target platform)
    "pop_pct",           # popularity percentile of the candidate in its platform, [0, 1]
    "log_hist_same",     # log1p(user's events on the target platform)
    "log_hist_total",    # log1p(user's events on all platforms)
    "retrieval_pct",     # candidate's retrieval position / N, [0, 1)
    "seen",              # 1 if the candidate is in the user's recent history (repeat buy)
    "covisit_same",      # log1p(summed co-visit counts with the user's target-platform items)
    "covisit_other",     # log1p(the same with the user's other-platform items)
    "covisit_knn",       # log1p((same + other) / sqrt(candidate's users + 1)): item-kNN score
    "covisit_cos",       # log1p(100 x cosine item-kNN score over the user's items)
    "covisit_last",      # log1p(co-visit count with the user's newest item)
)
N_FEATURES = len(FEATURES)


@dataclass
class UserContext:
    """What the ranker knows of the user; vectors float32 [dim], L2-normalised."""
    target_platform: str
    for_platform: np.ndarray
    fused: np.ndarray
    per_platform: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    # recent history, newest first: (platform, item_id) and float32 [n, dim] vectors
    history_keys: list[tuple[str, str]] = field(default_factory=list)
    history_vectors: np.ndarray | None = None


def candidate_features(user: UserContext, item_vectors: np.ndarray, seen: np.ndarray,
                       log_pop: np.ndarray, pop_pct: np.ndarray,
                       covisit: np.ndarray | None = None) -> np.ndarray:
    """float32 [N, N_FEATURES] for candidates in retrieval order (best first), every input an
    array over the N candidates (recmodel/pipeline.py gathers them by row).

    item_vectors float32 [N, dim]; seen bool [N] (in the user's target-platform history);
    log_pop and pop_pct float32 [N]; covisit float32 [N, 5] (CoVisits.features; zeros when
    None). See FEATURES.
    """
    n = len(item_vectors)
    out = np.zeros((n, N_FEATURES), dtype=np.float32)
    if n == 0:
        return out
    target = user.target_platform
    users = [user.for_platform, user.fused]
    same = user.per_platform.get(target)
    others = [v for p, v in user.per_platform.items() if p != target]
    # One matmul for every user vector and history item: [N, dim] @ [dim, m].
    columns = np.stack(users + ([same] if same is not None else []) + others, axis=1)
    n_hist = 0 if user.history_vectors is None else len(user.history_keys)
    if n_hist:
        columns = np.concatenate([columns, user.history_vectors.T], axis=1)
    sims = item_vectors @ columns
    out[:, 0:2] = sims[:, 0:2]
    col = 2
    if same is not None:
        out[:, 2] = sims[:, col]
        out[:, 3] = 1.0
        col += 1
    if others:
        out[:, 4] = sims[:, col:col + len(others)].max(axis=1)
        out[:, 5] = 1.0
        col += len(others)
    if n_hist:
        hist = sims[:, col:col + n_hist]
        is_same = np.asarray([p == target for p, _ in user.history_keys])
        if is_same.any():
            out[:, 6] = hist[:, is_same].max(axis=1)
        if (~is_same).any():
            out[:, 7] = hist[:, ~is_same].max(axis=1)
        out[:, 8] = hist[:, :5].mean(axis=1)
        out[:, 14] = seen
    out[:, 9] = log_pop
    out[:, 10] = pop_pct
    out[:, 11] = np.log1p(user.counts.get(target, 0))
    out[:, 12] = np.log1p(sum(user.counts.values()))
    out[:, 13] = np.arange(n, dtype=np.float32) / n
    if covisit is not None:
        out[:, 15:20] = covisit
    return out


def popularity_features(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log_pop, pop_pct) float32 [n] for one platform's per-item event counts."""
    counts = np.asarray(counts, dtype=np.float64)
    order = counts.argsort(kind="stable")
    pct = np.empty(len(counts), dtype=np.float32)
    pct[order] = np.arange(len(counts), dtype=np.float32) / max(len(counts) - 1, 1)
    return np.log1p(counts).astype(np.float32), pct
