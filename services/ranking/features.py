"""Ranker features: one definition shared by serving (ranking engine) and training (export).

For one request the ranker sees the user (vectors from fusion, recent history with item
vectors, event counts per platform) and N candidates of the target platform (item vectors,
popularity, retrieval order, co-visit counts with the user's items: services/ranking/covisit.py),
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


def candidate_features(user: UserContext, item_ids: list[str], item_vectors: np.ndarray,
                       log_pop: np.ndarray, pop_pct: np.ndarray,
                       covisit: np.ndarray | None = None) -> np.ndarray:
    """float32 [N, N_FEATURES] for candidates in retrieval order (best first).

    item_vectors float32 [N, dim]; log_pop and pop_pct float32 [N]; covisit float32 [N, 5]
    (CoVisits.features; zeros when None) (see FEATURES).
    """
    n = len(item_ids)
    out = np.zeros((n, N_FEATURES), dtype=np.float32)
    if n == 0:
        return out
    target = user.target_platform
    out[:, 0] = item_vectors @ user.for_platform
    out[:, 1] = item_vectors @ user.fused
    if target in user.per_platform:
        out[:, 2] = item_vectors @ user.per_platform[target]
        out[:, 3] = 1.0
    others = [v for p, v in user.per_platform.items() if p != target]
    if others:
        out[:, 4] = (item_vectors @ np.stack(others).T).max(axis=1)
        out[:, 5] = 1.0
    if user.history_vectors is not None and len(user.history_keys):
        sims = item_vectors @ user.history_vectors.T          # [N, n_hist]
        same = np.asarray([p == target for p, _ in user.history_keys])
        if same.any():
            out[:, 6] = sims[:, same].max(axis=1)
        if (~same).any():
            out[:, 7] = sims[:, ~same].max(axis=1)
        out[:, 8] = sims[:, :5].mean(axis=1)
        seen = {i for p, i in user.history_keys if p == target}
        out[:, 14] = [1.0 if i in seen else 0.0 for i in item_ids]
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
