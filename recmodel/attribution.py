"""What drove a recommended item's score: exact Shapley values of the ranker's score over four
groups of its features, against the request's mean candidate.

The ranker scores each candidate from its own feature row (a per-row MLP,
export/ranker_training.py), so for the k items returned the value of a coalition S of groups
is the score of the item's row with the groups outside S set to the mean candidate's values.
With four groups there are 16 coalitions: one ranker call of 16 k rows gives every value,
and the Shapley values follow exactly from them (no sampling). They add up to the item's
score minus the mean candidate's (the efficiency property), so a group's share says how much
it lifted this item above the average candidate of the same request. A group whose features
are the same for every candidate (the user's own counts) can only act through the others and
gets what it changes there, usually little: the explanation is about why this item rather
than another.

Groups (FEATURES in features.py):
- text: the item's similarity to the user's vectors and history items, and its retrieval
  position (retrieval is by the user vector);
- covisit: co-visitation with the user's history items (item-kNN counts);
- popularity: the item's events on the platform;
- history: the user's platform mix and history size, and whether the item is in it.
"""

from __future__ import annotations

from math import factorial

import numpy as np

from recmodel.features import FEATURES

TEXT, COVISIT, POPULARITY, HISTORY = "text", "covisit", "popularity", "history"
GROUPS: dict[str, tuple[str, ...]] = {
    TEXT: ("sim_target", "sim_fused", "sim_same", "sim_other", "max_hist_same",
           "max_hist_other", "mean_hist_recent", "retrieval_pct"),
    COVISIT: ("covisit_same", "covisit_other", "covisit_knn", "covisit_cos", "covisit_last"),
    POPULARITY: ("log_pop", "pop_pct"),
    HISTORY: ("has_same", "has_other", "log_hist_same", "log_hist_total", "seen"),
}
NAMES = tuple(GROUPS)
# bool [groups, features]: which features each group holds (every feature in exactly one).
MEMBERS = np.array([[f in GROUPS[g] for f in FEATURES] for g in NAMES])
assert (MEMBERS.sum(0) == 1).all(), "every ranker feature belongs to exactly one group"

_G = len(NAMES)
# Every coalition as a bool [groups] row; row c of COALITIONS is the bit pattern of c.
COALITIONS = np.array([[(c >> g) & 1 for g in range(_G)] for c in range(2 ** _G)], bool)
# Shapley weight of coalition c for a group g not in c: |S|! (G - |S| - 1)! / G! (the full
# coalition holds every group and is never used as one without g).
_WEIGHT = np.array([factorial(int(s)) * factorial(_G - int(s) - 1) / factorial(_G)
                    if s < _G else 0.0 for s in COALITIONS.sum(1)])


def shapley(score, features: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """float32 [k, groups] Shapley values (NAMES order) of `score` (float32 [N, F] -> [N], the
    ranker's) for each row of `features` float32 [k, F], against `baseline` float32 [F]."""
    k = len(features)
    if k == 0:
        return np.zeros((0, _G), np.float32)
    take = (COALITIONS.astype(np.int8) @ MEMBERS.astype(np.int8)) > 0  # [coalitions, F]
    rows = np.where(take[None], features[:, None, :], baseline[None, None, :])
    value = np.asarray(score(rows.reshape(-1, features.shape[1]).astype(np.float32)),
                       np.float64).reshape(k, len(COALITIONS))
    out = np.zeros((k, _G))
    for g in range(_G):
        without = np.flatnonzero(~COALITIONS[:, g])
        out[:, g] = ((value[:, without | (1 << g)] - value[:, without]) * _WEIGHT[without]).sum(1)
    return out.astype(np.float32)


def explain(driver: str, platform: str, source_cross: bool, history: list[tuple[str, str, str]],
            sims: np.ndarray | None, co_users: np.ndarray | None, popularity: int,
            seen: bool) -> tuple[str, list[tuple[str, str, str, float, int]]]:
    """(the line a person reads, the contributing history items: (platform, item_id, text,
    cosine, co-visit users) strongest first, at most 3) for one item whose score `driver`
    lifted most. `history`: the user's recent (platform, item_id, text), newest first; `sims`
    float [n] their cosine to the item; `co_users` int [n] their co-visit counts with it."""
    if sims is None or not len(history):
        if driver == POPULARITY:
            return f"popular on {platform} ({popularity} interactions)", []
        return "close to your profile", []
    by_sim = np.argsort(-sims, kind="stable")[:3]
    if driver == COVISIT and co_users is not None and co_users.max(initial=0) > 0:
        top = [j for j in np.argsort(-co_users, kind="stable")[:3] if co_users[j] > 0]
        p, _, text = history[top[0]]
        n = int(co_users[top[0]])
        who = "1 user who" if n == 1 else f"{n} users who"
        return (f"chosen by {who} also chose '{text[:60].rstrip()}' ({p})",
                [(*history[j][:2], history[j][2][:120], float(sims[j]), int(co_users[j]))
                 for j in top])
    contributions = [(*history[j][:2], history[j][2][:120], float(sims[j]), 0) for j in by_sim]
    if driver == POPULARITY:
        return f"popular on {platform} ({popularity} interactions)", contributions
    if driver == HISTORY and seen:
        return f"in your {platform} history", contributions
    p, text = contributions[0][0], contributions[0][2]
    lead = f"from your {p} history: like" if source_cross else "similar to"
    extra = {c[0] for c in contributions[1:]} - {p}
    also = f"; also your {', '.join(sorted(extra))} history" if extra else ""
    return f"{lead} '{text[:60].rstrip()}' ({p}){also}", contributions
