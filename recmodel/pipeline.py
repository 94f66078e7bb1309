"""The ranking pipeline, the one implementation that serving (RankingEngine.recommend),
training (export/ranker_training.py) and evaluation (export/systems.py) call: a user's
context and one platform's catalogue in, candidates, features, scores and the final order out.

    table = item_table(platform, index.snapshot(), counts, covisit)   # catalogue as rows
    ranked = rank(user, table, covisit, ranker, n, m)                 # best first

Everything is arrays indexed by catalogue row (an IndexSnapshot's rows): popularity,
co-visit rows, seen and exclude masks, item vectors. Per-item Python is left to the callers,
for the k items they return. Retrieval is a function (`table.snapshot.search` by default:
exact, pca or faiss, see recmodel/index.py); training passes its batched one.
Ties are broken by catalogue row everywhere, and a candidate's final order by its position
in the candidate list, so the same inputs give the same list on every path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from recmodel.covisit import CoVisits, Sums
from recmodel.features import UserContext, candidate_features, popularity_features
from recmodel.index import IndexSnapshot
from recmodel.ranker import Ranker

# (query float32 [dim], n, blocked bool [rows] | None) -> rows int64 [<= n], best first
Retrieve = Callable[[np.ndarray, int, "np.ndarray | None"], np.ndarray]


@dataclass(frozen=True)
class ItemTable:
    """One platform's catalogue at one moment as arrays over the snapshot's rows."""
    platform: str
    snapshot: IndexSnapshot
    log_pop: np.ndarray         # float32 [rows] popularity_features over the live rows
    pop_pct: np.ndarray         # float32 [rows]
    covisit_row: np.ndarray     # int64 [rows]: row in the co-visit counts, -1 unknown there
    row_of_covisit: np.ndarray  # int64 [co-visit rows]: this table's live row of one, or -1

    @property
    def vectors(self) -> np.ndarray:
        return self.snapshot.vectors


def item_table(platform: str, snapshot: IndexSnapshot, counts: np.ndarray,
               covisit: CoVisits | None) -> ItemTable:
    """The table of `snapshot`, whose rows have item event counts `counts` float [rows]
    (dead rows ignored): popularity percentiles are over the live rows in row order."""
    rows = len(snapshot.ids)
    alive = snapshot.alive
    log_pop = np.zeros(rows, np.float32)
    pop_pct = np.zeros(rows, np.float32)
    log_pop[alive], pop_pct[alive] = popularity_features(np.asarray(counts)[alive])
    if covisit is None:
        return ItemTable(platform, snapshot, log_pop, pop_pct, np.full(rows, -1, np.int64),
                         np.zeros(0, np.int64))
    covisit_row = covisit.rows([(platform, i) for i in snapshot.ids])
    row_of_covisit = np.full(len(covisit), -1, np.int64)
    live = np.flatnonzero(alive & (covisit_row >= 0))
    row_of_covisit[covisit_row[live]] = live
    return ItemTable(platform, snapshot, log_pop, pop_pct, covisit_row, row_of_covisit)


def seen_rows(user: UserContext, table: ItemTable) -> np.ndarray:
    """int64 live rows of the user's history items on the table's platform."""
    row_of = table.snapshot.row_of
    rows = [row_of.get(i) for p, i in user.history_keys if p == table.platform]
    return np.asarray([r for r in rows if r is not None], np.int64)


def covisit_top(covisit: CoVisits, sums: Sums, table: ItemTable, m: int,
                blocked: np.ndarray | None = None) -> np.ndarray:
    """Up to m live, unblocked rows of the table by the item-kNN score (same + other) /
    sqrt(users + 1), positive only, best first, ties by co-visit row."""
    code = covisit.platform_code(table.platform)
    if m <= 0 or code < 0:
        return np.zeros(0, np.int64)
    # Only rows the user's items co-visit can score above 0: a few thousand of the catalogue.
    crow = np.flatnonzero(sums.same + sums.other > 0)
    crow = crow[covisit.codes[crow] == code]
    trow = table.row_of_covisit[crow]
    score = (sums.same[crow] + sums.other[crow]) / np.sqrt(np.maximum(sums.deg[crow], 0) + 1)
    ok = (score > 0) & (trow >= 0)
    if blocked is not None:
        ok[ok] = ~blocked[trow[ok]]
    crow, score, trow = crow[ok], score[ok], trow[ok]
    if len(crow) > m:
        kth = -np.partition(-score, m - 1)[m - 1]
        best = score >= kth
        crow, score, trow = crow[best], score[best], trow[best]
    return trow[np.lexsort((crow, -score))][:m]


def merge_candidates(dense, covisit, n: int, m: int, rows: int | None = None) -> np.ndarray:
    """The ranker's candidate rows, length <= n: the first n - m of `dense` (nearest
    neighbours of the user vector, best first), then up to m of `covisit` (best first) not
    already in, then the following `dense` rows until n. Neither input holds a repeat;
    `rows`: the table's row count (default: the largest row + 1).
    retrieval_pct = position / n is a feature, so this order is part of the model."""
    dense = np.asarray(dense, np.int64)
    covisit = np.asarray(covisit, np.int64)
    if rows is None:
        rows = int(max(dense.max(initial=-1), covisit.max(initial=-1))) + 1
    taken = np.zeros(rows, bool)
    head = dense[:max(n - m, 0)]
    taken[head] = True
    extras = covisit[~taken[covisit]][:m]
    taken[extras] = True
    rest = dense[len(head):]
    rest = rest[~taken[rest]]
    return np.concatenate([head, extras, rest])[:n]


@dataclass
class Candidates:
    rows: np.ndarray          # int64 [N] table rows, retrieval order (best first)
    sums: Sums | None         # the user's co-visit sums (None without counts)
    seen: np.ndarray          # int64 rows of the user's target-platform history


def candidates(user: UserContext, table: ItemTable, covisit: CoVisits | None, n: int, m: int,
               exclude_seen: bool = False, retrieve: Retrieve | None = None,
               own_rows: np.ndarray | None = None) -> Candidates:
    """n rows by `retrieve` (default: the snapshot's search) of the user's for_platform
    vector, up to m of the last replaced by co-visit rows (merge_candidates); the user's
    seen items left out when `exclude_seen`. `own_rows` (training only): CoVisits.sums."""
    seen = seen_rows(user, table)
    blocked = None
    if exclude_seen and len(seen):
        blocked = np.zeros(len(table.snapshot.ids), bool)
        blocked[seen] = True
    dense = (retrieve or table.snapshot.search)(user.for_platform, n, blocked)
    if covisit is None:
        return Candidates(np.asarray(dense, np.int64), None, seen)
    sums = covisit.user_sums(user.history_keys, table.platform, own_rows)
    extra = covisit_top(covisit, sums, table, m, blocked)
    return Candidates(merge_candidates(dense, extra, n, m, len(table.snapshot.ids)), sums,
                      seen)


def features(user: UserContext, table: ItemTable, cands: Candidates,
             covisit: CoVisits | None, pop: tuple[np.ndarray, np.ndarray] | None = None
             ) -> np.ndarray:
    """float32 [N, N_FEATURES] of the candidates (recmodel/features.py). `pop`:
    (log_pop, pop_pct) float32 [rows] in place of the table's (training's leave-user-out)."""
    rows = cands.rows
    log_pop, pop_pct = pop if pop is not None else (table.log_pop, table.pop_pct)
    cov = (None if covisit is None or cands.sums is None
           else covisit.features(cands.sums, table.covisit_row[rows]))
    seen = np.zeros(len(table.snapshot.ids), bool)
    seen[cands.seen] = True
    return candidate_features(user, table.vectors[rows], seen[rows], log_pop[rows],
                              pop_pct[rows], cov)


@dataclass
class Ranked:
    rows: np.ndarray          # int64 [N] table rows, best first
    scores: np.ndarray        # float32 [N] the ranker's scores, same order
    candidates: Candidates
    features: np.ndarray      # float32 [N, N_FEATURES] the ranker's input, same order


def order(user: UserContext, table: ItemTable, cands: Candidates, covisit: CoVisits | None,
          ranker: Ranker) -> Ranked:
    """Features, `ranker.score` (float32 [N, F] -> [N]) and the order by score, ties by
    retrieval position."""
    feats = features(user, table, cands, covisit)
    scores = ranker.score(feats)
    best = np.argsort(-scores, kind="stable")
    return Ranked(cands.rows[best], scores[best], cands, feats[best])


def rank(user: UserContext, table: ItemTable, covisit: CoVisits | None, ranker: Ranker, n: int,
         m: int, exclude_seen: bool = False, retrieve: Retrieve | None = None) -> Ranked:
    """The whole pipeline: candidates(), then order()."""
    return order(user, table, candidates(user, table, covisit, n, m, exclude_seen, retrieve),
                 covisit, ranker)
