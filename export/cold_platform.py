"""The cold-platform ablation's evaluation: levers that score a platform's whole catalogue for a
user with no event on it yet (co-visitation, user-kNN over other-platform histories,
conditioned popularity), their fusion with crossrec's served order, and the tuning and figures
on two seeded halves of the validation users (ranks, NDCG/HR/MRR, bootstrap intervals of the
ratio to popularity). Built from the training users only. bench/cold_platform.py runs it and
writes the report."""

from __future__ import annotations

import random
import time

import numpy as np
import scipy.sparse as sp

from export.candidates import full_ranks
from export.metrics import hit_rate, mrr, ndcg

SEED = 0
BOOTSTRAP = 2000
# Popularity tie-break added to a lever's score: small enough never to reorder two items the
# lever tells apart, so an item the lever leaves at 0 falls back to the popularity order.
TIE = 1e-6


# ---------------------------------------------------------------------------- scorers

def user_knn_scores(query_items: np.ndarray, other: sp.csc_matrix, target: sp.csr_matrix,
                    other_sizes: np.ndarray, k: int, b: float) -> np.ndarray:
    """float64 [target items]: user-kNN by other-platform item overlap. `other` [users,
    other items] and `target` [users, target items] are the training users' 0/1 matrices;
    similarity = |query items & user's| / user's other-platform items^b; the k most similar
    users (k=0: all) vote their target items with their similarity."""
    overlap = np.asarray(other[:, np.unique(query_items)].sum(1)).ravel()
    return neighbour_votes(overlap / np.maximum(other_sizes, 1.0) ** b, target, k)


def neighbour_votes(sim: np.ndarray, target: sp.csr_matrix, k: int) -> np.ndarray:
    """float64 [target items]: sum of the top-k (k=0: all) positive similarities' rows."""
    sim = np.maximum(sim, 0.0)
    if 0 < k < len(sim):
        keep = np.argpartition(-sim, k - 1)[:k]
        top = np.zeros_like(sim)
        top[keep] = sim[keep]
        sim = top
    return np.asarray(target.T @ sim).ravel()


def positions(scores: np.ndarray) -> np.ndarray:
    """int32 0-based position of each item when sorted by score, ties by index."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    out = np.empty(len(scores), np.int32)
    out[order] = np.arange(len(scores))
    return out


def fuse(pos_a: np.ndarray, pos_b: np.ndarray, params: dict) -> np.ndarray:
    """A blend score of two orders (0-based positions) with weight w on `pos_a`: weighted
    reciprocal-rank fusion, or a linear blend of -log(1 + position). Ranks rather than
    scores: crossrec's scores past its candidates are on another scale."""
    w = params["w"]
    if params["method"] == "rrf":
        k0 = params["k0"]
        return w / (k0 + 1.0 + pos_a) + (1.0 - w) / (k0 + 1.0 + pos_b)
    return -(w * np.log1p(pos_a) + (1.0 - w) * np.log1p(pos_b))


class Levers:
    """Per case, each lever's score over the case platform's catalogue (float64 [n_P]),
    built from the training users only."""

    def __init__(self, data, cases):
        self.data, self.cases = data, cases
        self.pop = data.counts
        self.pids = {p: data.vocab[p] for p in data.catalogue}
        train = data.split.train  # the training users' sequences, sorted by user
        self.train = train
        n = len(data.ids)
        users = np.concatenate([np.full(len(s.items), u) for u, s in enumerate(train)])
        items = np.concatenate([s.items for s in train])
        x = sp.csr_matrix((np.ones(len(items)), (users, items)), shape=(len(train), n))
        x.data[:] = 1.0  # repeats count once per user
        self.by_platform = {p: x[:, rows].tocsr() for p, rows in data.catalogue.items()}
        # Columns indexed by global catalogue row, so query rows select directly.
        self.other = {p: x.multiply(self._mask(p)[None, :]).tocsc() for p in data.catalogue}
        self.other_sizes = {p: np.asarray(self.other[p].sum(1)).ravel()
                            for p in data.catalogue}
        self.profiles = {p: self._profiles(self.other[p]) for p in data.catalogue}
        self._windows: dict[int, sp.csr_matrix] = {}
        self._recent: dict[float, np.ndarray] = {}
        self._sums = [None] * len(cases)

    def _mask(self, target: str) -> np.ndarray:
        """float [n items]: 1 on every platform but `target`."""
        mask = np.ones(len(self.data.ids))
        mask[self.data.catalogue[target]] = 0.0
        return mask

    def _profiles(self, other: sp.csc_matrix) -> np.ndarray:
        """float32 [users, dim]: L2-normalised mean item vector of each user's items there."""
        sizes = np.asarray(other.sum(1)).ravel()
        prof = np.asarray(other.tocsr() @ self.data.vecs) / np.maximum(sizes, 1.0)[:, None]
        return (prof / np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
                ).astype(np.float32)

    def _rows(self, i: int) -> tuple[str, np.ndarray, np.ndarray]:
        c = self.cases[i]
        return c.platform, self.data.catalogue[c.platform], c.query.rows

    def _tie(self, rows: np.ndarray) -> np.ndarray:
        return TIE * np.log1p(self.pop[rows])

    def popularity(self, i: int) -> np.ndarray:
        return self.pop[self._rows(i)[1]].astype(np.float64)

    def covisit_sums(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(other, cos, deg) of CoVisits.sums over P's catalogue (float [n_P] each)."""
        platform, rows, hist = self._rows(i)
        if self._sums[i] is None:
            newest_first = hist[::-1]
            plats = np.array([self.data.ids[r][0] for r in newest_first], dtype=object)
            sums = self.data.covisit.sums(newest_first, plats, platform)
            self._sums[i] = (sums.other[rows].astype(np.float64),
                             sums.cos[rows].astype(np.float64), sums.deg[rows])
        return self._sums[i]

    def covisit(self, i: int, weighting: str, alpha: float) -> np.ndarray:
        rows = self._rows(i)[1]
        other, cos, deg = self.covisit_sums(i)
        base = other if weighting == "count" else cos
        return base / np.maximum(deg, 1.0) ** alpha + self._tie(rows)

    def _window_counts(self, window: int) -> sp.csr_matrix:
        """[n, n] pairs (i, j) of a training user's events on different platforms at most
        `window` positions apart in the merged sequence (both directions)."""
        if window not in self._windows:
            src, dst = [], []
            for s in self.train:
                t = np.arange(len(s.items))
                a, b = np.meshgrid(t, t, indexing="ij")
                keep = (np.abs(a - b) <= window) & (s.platforms[a] != s.platforms[b])
                src.append(s.items[a[keep]])
                dst.append(s.items[b[keep]])
            n = len(self.data.ids)
            src, dst = np.concatenate(src), np.concatenate(dst)
            m = sp.csr_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
            m.sum_duplicates()
            self._windows[window] = m
        return self._windows[window]

    def covisit_window(self, i: int, window: int, beta: float) -> np.ndarray:
        _, rows, hist = self._rows(i)
        counts = self._window_counts(window)[np.unique(hist)]
        near = np.asarray(counts.sum(0)).ravel()[rows]
        return np.log1p(near) + beta * np.log1p(self.pop[rows])

    def user_knn(self, i: int, similarity: str, k: int, b: float) -> np.ndarray:
        platform, rows, hist = self._rows(i)
        target = self.by_platform[platform]
        if similarity == "overlap":
            votes = user_knn_scores(hist, self.other[platform], target,
                                    self.other_sizes[platform], k, b)
        else:
            query = self.data.vecs[hist].mean(0)
            query /= max(float(np.linalg.norm(query)), 1e-12)
            votes = neighbour_votes(self.profiles[platform] @ query, target, k)
        return votes + self._tie(rows)

    def pop_neighbours(self, i: int, prior_events: float) -> np.ndarray:
        platform, rows, hist = self._rows(i)
        shares = np.asarray(self.other[platform][:, np.unique(hist)].sum(1)).ravel() > 0
        local = neighbour_votes(shares.astype(np.float64), self.by_platform[platform], 0)
        glob = self.pop[rows] / max(self.pop[rows].sum(), 1.0)
        return (local + prior_events * glob) / (local.sum() + prior_events) + self._tie(rows)

    def pop_text(self, i: int, tau: float) -> np.ndarray:
        _, rows, hist = self._rows(i)
        query = self.data.vecs[hist].mean(0)
        query /= max(float(np.linalg.norm(query)), 1e-12)
        return np.log1p(self.pop[rows]) + (self.data.vecs[rows] @ query) / tau

    def pop_recent(self, i: int, gamma: float) -> np.ndarray:
        if gamma not in self._recent:
            counts = np.zeros(len(self.data.ids))
            for s in self.train:
                for pid in np.unique(s.platforms):
                    at = np.flatnonzero(s.platforms == pid)
                    np.add.at(counts, s.items[at], gamma ** np.arange(len(at))[::-1])
            self._recent[gamma] = counts
        rows = self._rows(i)[1]
        return self._recent[gamma][rows] + self._tie(rows)


# ---------------------------------------------------------------------------- evaluation

def split_halves(users: list[str], seed: int = SEED) -> tuple[set[str], set[str]]:
    """(tune, held-out): the sorted users shuffled with `seed`, first half and the rest."""
    order = sorted(users)
    random.Random(seed).shuffle(order)
    return set(order[:len(order) // 2]), set(order[len(order) // 2:])


def group_metrics(ranks: np.ndarray, sel: np.ndarray) -> dict:
    r = ranks[sel]
    return {"ndcg@10": ndcg(r, 10), "hr@10": hit_rate(r, 10), "mrr": mrr(r), "n": int(len(r))}


def bootstrap_ratio(ranks: np.ndarray, base: np.ndarray, user_of: np.ndarray,
                    sel: np.ndarray, seed: int = SEED) -> list[float]:
    """95% interval of NDCG@10(ranks) / NDCG@10(base) over `sel`, users resampled (a user's
    two cases move together)."""
    users, inverse = np.unique(user_of[sel], return_inverse=True)
    gain = np.bincount(inverse, _gains(ranks[sel]), len(users))
    gain_base = np.bincount(inverse, _gains(base[sel]), len(users))
    draws = np.random.default_rng(seed).integers(0, len(users), (BOOTSTRAP, len(users)))
    ratio = gain[draws].sum(1) / np.maximum(gain_base[draws].sum(1), 1e-12)
    return [float(np.quantile(ratio, 0.025)), float(np.quantile(ratio, 0.975))]


def _gains(ranks: np.ndarray) -> np.ndarray:
    return np.where(ranks <= 10, 1.0 / np.log2(np.minimum(ranks, 1e12) + 1.0), 0.0)


class Runner:
    """Ranks, metrics and tuning of levers on the cases, with per-case target positions."""

    def __init__(self, data, cases, half_of: np.ndarray):
        self.cases = cases
        self.targets = np.array([data.local[c.query.target_row] for c in cases], np.int64)
        self.user_of = np.array([c.user_id for c in cases])
        self.halves = {"half1": half_of == 1, "half2": half_of == 2,
                       "all": np.ones(len(cases), bool)}
        self.pop_ranks: np.ndarray | None = None

    def ranks(self, score) -> tuple[np.ndarray, float]:
        """(1-based rank of each case's target under score(i) -> float [n_P], mean ms per
        case of score())."""
        out = np.zeros(len(self.cases))
        spent = 0.0
        for i in range(len(self.cases)):
            t = time.perf_counter()
            s = score(i)
            spent += time.perf_counter() - t
            out[i] = full_ranks(s[None], self.targets[i:i + 1])[0]
        return out, 1000.0 * spent / len(self.cases)

    def report(self, ranks: np.ndarray, ms: float | None = None) -> dict:
        out = {"metrics": {h: group_metrics(ranks, sel) for h, sel in self.halves.items()}}
        if self.pop_ranks is not None:
            out["ratio_to_popularity"] = {
                h: out["metrics"][h]["ndcg@10"] / max(ndcg(self.pop_ranks[sel], 10), 1e-12)
                for h, sel in self.halves.items()}
            out["ratio_ci95"] = {h: bootstrap_ratio(ranks, self.pop_ranks, self.user_of,
                                                    self.halves[h]) for h in ("half2", "all")}
        if ms is not None:
            out["ms_per_case"] = round(ms, 3)
        return out

    def tune(self, grid: list[dict], score) -> tuple[dict, np.ndarray, float, list[dict]]:
        """(best params on half 1 by NDCG@10, first in grid on ties; their ranks; ms per case;
        the grid's half-1 NDCG@10)."""
        best = None
        table = []
        for params in grid:
            ranks, ms = self.ranks(lambda i, p=params: score(i, **p))
            value = ndcg(ranks[self.halves["half1"]], 10)
            table.append({"params": params, "half1_ndcg@10": value})
            if best is None or value > best[0]:
                best = (value, params, ranks, ms)
            print(f"  {params} half1 NDCG@10 {value:.4f}", flush=True)
        return best[1], best[2], best[3], table


def crossrec_positions(system, cases) -> tuple[list[np.ndarray], np.ndarray, float]:
    """(per case the served order as 0-based positions over P's table rows: the ranked
    candidates, then the rest by dot product, ties by row, as export.candidates.
    candidate_ranks; 1-based target ranks of rank_cases, the served evaluation; its mean ms
    per case)."""
    t = time.perf_counter()
    _, served = system.rank_cases(cases)
    ms = 1000.0 * (time.perf_counter() - t) / len(cases)
    out = []
    for c in cases:
        ctx, ranked = system.ranked(c.query)
        dots = system.data.tables[c.platform].vectors @ ctx.for_platform
        rest = np.ones(len(dots), bool)
        rest[ranked.rows] = False
        rest = np.flatnonzero(rest)
        order = np.concatenate([ranked.rows, rest[np.lexsort((rest, -dots[rest]))]])
        pos = np.empty(len(dots), np.int32)
        pos[order] = np.arange(len(dots))
        out.append(pos)
    return out, np.asarray(served, float), ms


def blend(xr_pos: list[np.ndarray], lever_pos: list[np.ndarray]):
    """score(i, **fuse params) of crossrec's order fused with a lever's."""
    return lambda i, **params: fuse(xr_pos[i], lever_pos[i], params)
