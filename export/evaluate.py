"""Offline evaluation: full-catalogue ranking quality of crossrec and baselines on the user
tower's validation users, written to bench/results/eval.json and bench/results/eval.png.

    python -m export.evaluate --model-repo models [--users N]

Protocol A (ours): leave-last-out per platform. For each validation user and platform P the
target is the user's last event on P (all rows, history and held-out targets, in seq_index
order), the input every earlier event on both platforms; warm = that input, cold = the input
without any event on P. The target is ranked against P's whole catalogue (no sampled negatives).
Protocol B (URLLM, arXiv 2406.03085, Table 3): input = the user's merged role=history rows,
target = each role=heldout_target row, ranked against its platform's whole catalogue, one row
pooled over both platforms. Our copy withholds the source's test users, so protocol B here is
on our validation users, not on their test split.

A system is a callable(user_events, platform) -> ranked item ids (TOP_K), user_events being
BehaviorEvent fields (clients.datasets.to_event) oldest first; in-process systems also offer
rank_cases(cases) -> (top lists, full ranks) for batched evaluation and exact MRR. To evaluate
another system (e.g. Recommend over running services) on the same users and metrics:

    cases = build_cases("A", "cold", validation_users()[:200])
    metrics = evaluate_system(my_rank, cases)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as _platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from clients.datasets import AMAZON, AMAZON_ORIGIN_MS, item_texts
from export import ranker as rk
from services.common.modelrepo import read_meta, resolve, versions
from services.fusion.model import SERVED_THREADS, BaselineUserModel
from services.ranking import pipeline
from services.ranking.features import UserContext
from services.ranking.ranker import OnnxRanker

log = logging.getLogger("export.evaluate")

INT8_ENCODER = "encoder_int8"
TOP_K = 100
K = 10
SYSTEMS = ("crossrec", "crossrec_retrieval_only", "fusion_untrained", "popularity",
           "text_similarity", "als", "itemknn", "crossrec_int8")
BASELINES = ("fusion_untrained", "popularity", "text_similarity", "als", "itemknn")
SETTINGS = (("A", "warm"), ("A", "cold"), ("B", "warm"))
# arXiv 2406.03085 Table 3, Amazon Arts/Office, (HR@10, NDCG@10) on their test users.
PUBLISHED = {"C2DSR": (0.0320, 0.0234), "UniSRec": (0.0375, 0.0242),
             "GPT4Rec": (0.0435, 0.0287), "URLLM": (0.0485, 0.0371)}
RESULTS_DIR = Path("bench/results")
# ALS on the training users' (user, item) counts, the best of a small grid on these same
# validation users (A warm NDCG@10; factors 64-512, regularization 0.1-30, alpha 1-40), so the
# baseline is if anything flattered: (128, 1, 5) .0325, (128, 10, 20) .0363, (256, 10, 20)
# .0392, (512, 10, 20) .0388, (256, 30, 40) .0398.
ALS_PARAMS = {"factors": 256, "regularization": 30.0, "alpha": 40.0, "iterations": 15}


# ---------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One evaluation query: a user's input events, the platform to rank, the true item."""
    case_id: str          # unique per case (a fresh user id for an end-to-end system)
    protocol: str         # "A" or "B"
    setting: str          # "warm" or "cold"
    user_id: str
    platform: str
    target: str           # item_id on `platform`
    events: list[dict]    # input, BehaviorEvent fields, oldest first
    query: rk.Query       # the same input as catalogue rows (in-process systems)


_DATA: dict = {}


def default_data(repo: str | os.PathLike | None = None, dataset: str = AMAZON) -> rk.RankData:
    """The evaluation data (item vectors, sequences, split), loaded once per process."""
    repo = str(repo or os.environ.get("CROSSREC_MODEL_REPO", "models"))
    key = (repo, dataset)
    if key not in _DATA:
        _DATA[key] = rk.load_data(repo, dataset)
    return _DATA[key]


_TEXTS: dict = {}


def _texts(dataset: str) -> dict:
    if dataset not in _TEXTS:
        try:
            _TEXTS[dataset] = item_texts(dataset)
        except FileNotFoundError:  # data built in memory (tests): events carry no text
            _TEXTS[dataset] = {}
    return _TEXTS[dataset]


def validation_users(data: rk.RankData | None = None) -> list[str]:
    """The user tower's validation users (held out from every training), sorted."""
    return sorted((data or default_data()).val_ids)


def _events(data: rk.RankData, q: rk.Query, case_id: str) -> list[dict]:
    texts = _texts(data.dataset)
    out = []
    for i, (row, action, weight) in enumerate(zip(q.rows, q.actions, q.weights)):
        platform, item_id = data.ids[row]
        out.append(dict(event_id=f"{case_id}:{i}", user_id=case_id, platform=platform,
                        action=int(action), item_id=item_id,
                        item_text=texts.get((platform, item_id), ""),
                        event_time_ms=AMAZON_ORIGIN_MS + i * 60_000,
                        weight=None if int(action) != 6 else float(weight)))
    return out


def build_cases(protocol: str, setting: str, users, data: rk.RankData | None = None) -> list[Case]:
    """Cases of `users` (user ids) for protocol "A" (leave-last-out per platform) or "B"
    (URLLM held-out targets given the history rows); setting "warm", or "cold" (every event
    on the target platform removed from the input). Users without a usable input are skipped."""
    if protocol not in ("A", "B") or setting not in ("warm", "cold"):
        raise ValueError(f"protocol must be A or B and setting warm or cold, got "
                         f"{protocol!r}, {setting!r}")
    data = data or default_data()
    cold = setting == "cold"
    by_id = {s.user_id: s for s in data.seqs}
    cases = []
    for user_id in users:
        s = by_id[user_id]
        if protocol == "A":
            queries = rk.last_on_platform_queries(data, s, cold)
        else:
            queries = [q for t in range(s.n_history, len(s.items))
                       if (q := rk.seq_query(data, s, t, cold, end=s.n_history)) is not None]
        for j, q in enumerate(queries):
            case_id = f"eval-{protocol}-{setting}-{user_id}-{j}"
            cases.append(Case(case_id, protocol, setting, user_id, q.target_platform,
                              data.ids[q.target_row][1], _events(data, q, case_id), q))
    return cases


# ---------------------------------------------------------------------------- metrics

def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Share of cases whose target's 1-based rank is <= k (np.inf: not ranked)."""
    return float((np.asarray(ranks, float) <= k).mean())


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item: 1/log2(rank + 1) when rank <= k, else 0."""
    r = np.asarray(ranks, float)
    return float(np.where(r <= k, 1.0 / np.log2(np.minimum(r, 1e12) + 1.0), 0.0).mean())


def mrr(ranks: np.ndarray) -> float:
    return float((1.0 / np.asarray(ranks, float)).mean())


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


def ranks_from_lists(tops: list[list[str]], targets: list[str]) -> np.ndarray:
    """1-based rank of each target in its list; np.inf when absent."""
    return np.array([t.index(g) + 1 if g in t else np.inf for t, g in zip(tops, targets)])


def evaluate_system(rank, cases: list[Case], data: rk.RankData | None = None) -> dict:
    """{"pooled" | platform: metrics} of a system on `cases`.

    `rank`: callable(user_events, platform) -> ranked item ids (the first TOP_K are used; MRR
    then counts a target below them as 0), or an object with rank_cases(cases) -> (top lists,
    full 1-based ranks) for exact MRR. Metrics: hr@10, ndcg@10, recall@20 (= HR@20, one
    target), mrr, coverage@10, novelty@10, ild@10 (item text vectors), n.
    """
    data = data or default_data()
    if hasattr(rank, "rank_cases"):
        tops, ranks = rank.rank_cases(cases)
        ranks = np.asarray(ranks, float)
    else:
        tops = [[str(i) for i in list(rank(c.events, c.platform))[:TOP_K]] for c in cases]
        ranks = ranks_from_lists(tops, [c.target for c in cases])
    totals = {p: data.counts[rows].sum() for p, rows in data.catalogue.items()}
    sizes = {p: len(rows) for p, rows in data.catalogue.items()}

    def share_fn(platform):
        # Add-one smoothing: an item no training user touched still has a finite novelty.
        def share(item_id):
            row = data.row_of.get((platform, item_id))
            count = data.counts[row] if row is not None else 0.0
            return (count + 1.0) / (totals[platform] + sizes[platform])
        return share

    def group(sel: list[int]) -> dict:
        r = ranks[sel]
        out = {"hr@10": hit_rate(r, 10), "ndcg@10": ndcg(r, 10), "recall@20": hit_rate(r, 20),
               "mrr": mrr(r), "n": len(sel)}
        by_platform = {}
        for i in sel:
            by_platform.setdefault(cases[i].platform, []).append(i)
        items = {(cases[i].platform, x) for i in sel for x in tops[i][:K]}
        out["coverage@10"] = len(items) / sum(sizes[p] for p in by_platform)
        out["novelty@10"] = float(np.mean([novelty([tops[i]], share_fn(cases[i].platform))
                                           for i in sel]))
        vecs = [data.vecs[[data.row_of[(cases[i].platform, x)] for x in tops[i][:K]
                           if (cases[i].platform, x) in data.row_of]] for i in sel]
        out["ild@10"] = intra_list_diversity(vecs)
        return out

    result = {"pooled": group(list(range(len(cases))))}
    for p in sorted({c.platform for c in cases}):
        result[p] = group([i for i, c in enumerate(cases) if c.platform == p])
    return result


# ---------------------------------------------------------------------------- systems

class CatalogueSystem:
    """Scores a platform's whole catalogue per query; ties broken by catalogue order."""

    name = "system"
    chunk = 256

    def __init__(self, data: rk.RankData):
        self.data = data
        self._local = {p: {int(r): i for i, r in enumerate(rows)}
                       for p, rows in data.catalogue.items()}

    def score(self, queries: list[rk.Query], platform: str) -> np.ndarray:
        """float [len(queries), catalogue size of platform]."""
        raise NotImplementedError

    def _rank_platform(self, queries, platform, targets):
        rows = self.data.catalogue[platform]
        top, ranks = rk.top_and_rank(self.score(queries, platform), TOP_K, targets)
        return rows[top], ranks

    def rank_cases(self, cases: list[Case]):
        tops, ranks = [None] * len(cases), np.zeros(len(cases), np.int64)
        for p in self.data.catalogue:
            sel = [i for i, c in enumerate(cases) if c.platform == p]
            local = self._local[p]
            for c0 in range(0, len(sel), self.chunk):
                part = sel[c0:c0 + self.chunk]
                queries = [cases[i].query for i in part]
                targets = np.array([local.get(q.target_row, -1) for q in queries], np.int64)
                known = targets >= 0
                top, r = self._rank_platform(queries, p, np.where(known, targets, 0))
                for j, i in enumerate(part):
                    tops[i] = [self.data.ids[x][1] for x in top[j]]
                    ranks[i] = r[j] if known[j] else 0
        return tops, ranks

    def __call__(self, user_events: list[dict], platform: str) -> list[str]:
        """Ranked item ids (TOP_K) of `platform` for BehaviorEvent-field dicts."""
        keep = [e for e in user_events if (e["platform"], e["item_id"]) in self.data.row_of]
        q = rk.Query(keep[0]["user_id"] if keep else "", np.array(
            [self.data.row_of[(e["platform"], e["item_id"])] for e in keep], np.int64),
            np.array([e["action"] for e in keep], np.int64),
            np.array([e["weight"] or 1.0 for e in keep], np.float32), platform, -1)
        case = Case("adhoc", "", "", q.user_id, platform, "", user_events, q)
        return self.rank_cases([case])[0][0]


class UserVectorSystem(CatalogueSystem):
    """dot(user model's for_platform vector, item vector): the user tower or the baseline."""

    def __init__(self, data, user_model, name):
        super().__init__(data)
        self.model, self.name = user_model, name

    def score(self, queries, platform):
        users = np.stack([rk.user_context(self.model, self.data, q).for_platform
                          for q in queries])
        return users @ self.data.vecs[self.data.catalogue[platform]].T


class PopularitySystem(CatalogueSystem):
    name = "popularity"

    def score(self, queries, platform):
        counts = self.data.counts[self.data.catalogue[platform]]
        return np.broadcast_to(counts, (len(queries), len(counts)))


class TextSimilaritySystem(CatalogueSystem):
    """Mean of the input events' item text vectors; no training, no recency."""

    name = "text_similarity"

    def score(self, queries, platform):
        users = np.stack([self.data.vecs[q.rows].mean(0) for q in queries])
        return users @ self.data.vecs[self.data.catalogue[platform]].T


class ALSSystem(CatalogueSystem):
    """implicit ALS: item factors from the training users' (user, item) event counts; a
    query's user factor is solved from its input events alone against those fixed item
    factors (implicit's recalculate_user, the exact ALS user step), so validation users'
    targets and, cold, their target-platform events never reach the model."""

    name = "als"

    def __init__(self, data, params=None, seed=0):
        super().__init__(data)
        from implicit.cpu.als import AlternatingLeastSquares
        from scipy.sparse import csr_matrix
        self.params = dict(params or ALS_PARAMS)
        train = [s for s in data.seqs if s.user_id in data.train_ids]
        rows = np.concatenate([np.full(len(s.items), u) for u, s in enumerate(train)])
        cols = np.concatenate([s.items for s in train])
        self._csr = csr_matrix
        matrix = csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                            shape=(len(train), len(data.ids)))
        matrix.sum_duplicates()
        rk.limit_blas_threads()  # scipy's OpenBLAS is loaded only now
        self.model = AlternatingLeastSquares(**self.params, random_state=seed, num_threads=2)
        self.model.fit(matrix, show_progress=False)

    def score(self, queries, platform):
        indptr = np.cumsum([0] + [len(q.rows) for q in queries])
        cols = np.concatenate([q.rows for q in queries])
        m = self._csr((np.ones(len(cols), np.float32), cols, indptr),
                      shape=(len(queries), len(self.data.ids)))
        m.sum_duplicates()
        users = self.model.recalculate_user(np.arange(len(queries)), m)
        return users @ self.model.item_factors[self.data.catalogue[platform]].T


class ItemKNNSystem(CatalogueSystem):
    """Item-based collaborative filtering: an item's score is the number of training users who
    had it together with each of the query's distinct input items, summed, over
    sqrt(its users + 1) (the best damping of 0, .3, .4, .5, .6, .7, .8 on these validation
    users, A warm: flattered like ALS); ties by popularity. The same counts as the ranker's
    co-visit features (services/ranking/covisit.py)."""

    name = "itemknn"

    def score(self, queries, platform):
        rows = self.data.catalogue[platform]
        tie = 1e-6 * np.log1p(self.data.counts[rows])
        out = np.zeros((len(queries), len(rows)))
        for i, q in enumerate(queries):
            sums = self.data.covisit.sums(
                q.rows, np.array([self.data.ids[r][0] for r in q.rows], dtype=object), platform)
            out[i] = (sums.same + sums.other)[rows] / np.sqrt(sums.deg[rows] + 1) + tie
        return out


class CrossrecSystem(CatalogueSystem):
    """The served pipeline (services/ranking/pipeline.rank) query by query, with the exported
    ranker and its co-visit counts: user tower -> candidates by dot product with co-visit
    items merged in -> ranker; items below the candidates keep retrieval order after them."""

    def __init__(self, data, user_model, ranker, name="crossrec"):
        if ranker.covisit is not None and ranker.covisit.keys != data.covisit.keys:
            raise ValueError(f"ranker v{ranker.version} was trained on another catalogue")
        super().__init__(replace(data, covisit=ranker.covisit) if ranker.covisit else data)
        self.model, self.ranker, self.name = user_model, ranker, name

    def _rank_platform(self, queries, platform, targets):
        data = self.data
        rows = data.catalogue[platform]
        top, ranks = [], np.zeros(len(queries), np.int64)
        for i, q in enumerate(queries):
            ctx, ranked = self.ranked(q)
            top.append(rows[ranked.rows[:TOP_K]])
            hit = np.flatnonzero(ranked.rows == targets[i])
            ranks[i] = (hit[0] + 1 if len(hit) else
                        rk.candidate_ranks(data, ctx, ranked.rows, int(targets[i])))
        return np.stack(top), ranks

    def ranked(self, query: rk.Query) -> tuple[UserContext, pipeline.Ranked]:
        """One query's user context and its whole ranked candidate list (table rows of the
        query's platform, scores), as the served Recommend computes them."""
        # One BLAS thread, as in the served processes (OPENBLAS_NUM_THREADS=1 in
        # services/ranking/server.py): the same kernels and splits, the same bits.
        with threadpool_limits(1, user_api="blas"):
            ctx = rk.user_context(self.model, self.data, query)
            return ctx, pipeline.rank(ctx, self.data.tables[query.target_platform],
                                      self.ranker.covisit, self.ranker,
                                      self.ranker.candidates, self.ranker.covisit_candidates)


def int8_cache_path(repo: str | os.PathLike, dataset: str, version: int) -> Path:
    return Path(repo) / "cache" / f"item_vectors-{dataset}-{INT8_ENCODER}-v{version}.npz"


def int8_item_vectors(dataset: str = AMAZON, repo: str | os.PathLike = "models",
                      build: bool = True) -> tuple[list[tuple[str, str]], np.ndarray, int] | None:
    """Catalogue vectors from the int8 encoder (same order and text as export.item_vectors),
    cached beside the fp32 cache; None when absent and `build` is False."""
    from export.item_vectors import _texts_digest, catalogue_texts, embed_texts

    if not versions(repo, INT8_ENCODER):
        return None
    model_dir = resolve(repo, INT8_ENCODER)
    version, meta = int(model_dir.name), read_meta(model_dir)
    ids, texts = catalogue_texts(dataset)
    digest = _texts_digest(ids, texts)
    path = int8_cache_path(repo, dataset, version)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["texts_sha256"]) == digest:
                return ids, z["vecs"].astype(np.float32), version
    if not build:
        return None
    log.info("embedding %d items with %s v%d", len(texts), INT8_ENCODER, version)
    vecs = embed_texts(model_dir, meta, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, vecs=vecs, texts_sha256=np.array(digest), encoder_version=np.array(version))
    os.replace(tmp, path)
    return ids, vecs, version


def load_ranker(repo: str | os.PathLike, version: int | None = None) -> OnnxRanker:
    """The exported ranker as serving loads it (services/ranking/ranker.py)."""
    return OnnxRanker(resolve(repo, rk.MODEL_NAME, version))


def rank_fn(system: str, repo: str | os.PathLike = "models", data: rk.RankData | None = None):
    """The named in-process system as callable(user_events, platform) -> item ids (TOP_K)."""
    data = data or default_data(repo)
    if system == "popularity":
        return PopularitySystem(data)
    if system == "text_similarity":
        return TextSimilaritySystem(data)
    if system == "als":
        return ALSSystem(data)
    if system == "itemknn":
        return ItemKNNSystem(data)
    if system == "fusion_untrained":
        return UserVectorSystem(data, BaselineUserModel(), system)
    tower = rk.load_user_model(repo, intra_op_threads=SERVED_THREADS)
    if system == "crossrec_retrieval_only":
        return UserVectorSystem(data, tower, system)
    if system in ("crossrec", "crossrec_int8"):
        ranker = load_ranker(repo)
        if system == "crossrec_int8":
            found = int8_item_vectors(data.dataset, repo, build=False)
            if found is None:
                raise FileNotFoundError("no int8 item-vector cache; run export.evaluate once")
            data = data.with_vectors(found[1], {"name": INT8_ENCODER, "version": found[2]})
        return CrossrecSystem(data, tower, ranker, system)
    raise ValueError(f"system must be one of {SYSTEMS}, got {system!r}")


# ---------------------------------------------------------------------------- report

def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _label(protocol: str, setting: str) -> str:
    return f"{protocol}_{setting}"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("A_warm", "Protocol A, warm"), ("A_cold", "Protocol A, cold platform"),
              ("B_warm", "Protocol B (URLLM targets), our val users")]
    systems = [s for s in SYSTEMS if s in results]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    x = np.arange(len(systems))
    for ax, (key, title) in zip(axes, panels):
        ndcg_v = [results[s].get(key, {}).get("pooled", {}).get("ndcg@10", 0) for s in systems]
        hr_v = [results[s].get(key, {}).get("pooled", {}).get("hr@10", 0) for s in systems]
        ax.bar(x - 0.2, ndcg_v, 0.4, label="NDCG@10")
        ax.bar(x + 0.2, hr_v, 0.4, label="HR@10")
        if key == "B_warm":
            hr_u, ndcg_u = PUBLISHED["URLLM"]
            ax.axhline(ndcg_u, color="C0", ls="--", lw=1, label=f"URLLM NDCG@10 {ndcg_u}")
            ax.axhline(hr_u, color="C1", ls="--", lw=1, label=f"URLLM HR@10 {hr_u}")
        ax.set_xticks(x, systems, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    counts = [results[systems[0]].get(k, {}).get("pooled", {}).get("n") for k, _ in panels]
    fig.suptitle("Full-catalogue ranking, pooled over arts_crafts + office "
                 f"(validation users, n per panel: {counts})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(results: dict) -> str:
    lines = []
    for key in [_label(*s) for s in SETTINGS]:
        groups = sorted({g for r in results.values() for g in r.get(key, {})},
                        key=lambda g: (g != "pooled", g))
        for g in groups:
            lines.append(f"[{key} / {g}]")
            lines.append(f"  {'system':26s} {'HR@10':>7s} {'NDCG@10':>8s} {'R@20':>7s} "
                         f"{'MRR':>7s} {'cov@10':>7s} {'nov@10':>7s} {'ILD@10':>7s} {'n':>5s}")
            for s, r in results.items():
                m = r.get(key, {}).get(g)
                if m:
                    lines.append(f"  {s:26s} {m['hr@10']:7.4f} {m['ndcg@10']:8.4f} "
                                 f"{m['recall@20']:7.4f} {m['mrr']:7.4f} {m['coverage@10']:7.4f} "
                                 f"{m['novelty@10']:7.2f} {m['ild@10']:7.4f} {m['n']:5d}")
    return "\n".join(lines)


def targets_report(results: dict) -> dict:
    def n(system, key):
        return results.get(system, {}).get(key, {}).get("pooled", {}).get("ndcg@10")

    out = {}
    if n("crossrec", "A_warm") is not None:
        best = max((b for b in BASELINES if n(b, "A_warm") is not None),
                   key=lambda b: n(b, "A_warm"))
        ratio = n("crossrec", "A_warm") / max(n(best, "A_warm"), 1e-12)
        out["warm_vs_best_baseline"] = {"target": ">= 1.3x", "best_baseline": best,
                                        "ratio": ratio, "met": ratio >= 1.3}
    if n("crossrec", "A_cold") is not None and n("popularity", "A_cold") is not None:
        ratio = n("crossrec", "A_cold") / max(n("popularity", "A_cold"), 1e-12)
        best = max((b for b in BASELINES if n(b, "A_cold") is not None),
                   key=lambda b: n(b, "A_cold"))
        out["cold_vs_popularity"] = {"target": ">= 2x", "ratio": ratio, "met": ratio >= 2.0,
                                     "best_baseline": best, "ratio_vs_best_baseline":
                                     n("crossrec", "A_cold") / max(n(best, "A_cold"), 1e-12)}
    b = results.get("crossrec", {}).get("B_warm", {}).get("pooled")
    if b:
        hr_u, ndcg_u = PUBLISHED["URLLM"]
        out["protocol_b_vs_urllm"] = {
            "ours": {"hr@10": b["hr@10"], "ndcg@10": b["ndcg@10"], "n": b["n"]},
            "urllm": {"hr@10": hr_u, "ndcg@10": ndcg_u},
            "hr_ratio": b["hr@10"] / hr_u, "ndcg_ratio": b["ndcg@10"] / ndcg_u,
            "caveat": "ours: our validation users (URLLM's train/valid users re-split); "
                      "theirs: their withheld test users; same data, item set and protocol"}
    return out


def run(repo: str, users: int | None, out_dir: Path, systems: tuple[str, ...] = SYSTEMS,
        dataset: str = AMAZON, seed: int = 0, allow_baseline: bool = False) -> dict:
    t0 = time.monotonic()
    data = default_data(repo, dataset)
    val_users = validation_users(data)
    if users:
        val_users = val_users[:users]
    cases = {_label(p, s): build_cases(p, s, val_users, data) for p, s in SETTINGS}
    log.info("%d validation users; cases: %s; data ready in %.0fs", len(val_users),
             {k: len(v) for k, v in cases.items()}, time.monotonic() - t0)
    models = {}
    tower = rk.load_user_model(repo, allow_baseline=allow_baseline,
                               intra_op_threads=SERVED_THREADS)
    models["user_tower"] = {"name": tower.name, "version": tower.version}
    ranker_meta, n_cands, n_cov = None, rk.CANDIDATES, 0
    if versions(repo, rk.MODEL_NAME):
        ranker = load_ranker(repo)
        ranker_meta = ranker.meta
        n_cands, n_cov = ranker.candidates, ranker.covisit_candidates
        models["ranker"] = {"version": ranker_meta["version"], "candidates": n_cands,
                            "covisit_candidates": n_cov,
                            "user_tower": ranker_meta.get("user_tower")}
        if ranker_meta.get("user_tower", {}).get("version") != tower.version:
            log.warning("ranker v%s was trained on user_tower v%s, evaluating with v%s",
                        ranker_meta["version"], ranker_meta.get("user_tower", {}).get("version"),
                        tower.version)
    builders = {
        "crossrec": lambda: CrossrecSystem(data, tower, ranker, "crossrec"),
        "crossrec_retrieval_only": lambda: UserVectorSystem(data, tower,
                                                            "crossrec_retrieval_only"),
        "fusion_untrained": lambda: UserVectorSystem(data, BaselineUserModel(),
                                                     "fusion_untrained"),
        "popularity": lambda: PopularitySystem(data),
        "text_similarity": lambda: TextSimilaritySystem(data),
        "als": lambda: ALSSystem(data, seed=seed),
        "itemknn": lambda: ItemKNNSystem(data),
    }
    int8_note = None
    if "crossrec_int8" in systems and ranker_meta is not None:
        t = time.monotonic()
        found = int8_item_vectors(dataset, repo, build=True)
        if found is not None:
            int8_data = data.with_vectors(found[1], {"name": INT8_ENCODER, "version": found[2]})
            cos = np.einsum("nd,nd->n", data.vecs, found[1] /
                            np.linalg.norm(found[1], axis=1, keepdims=True))
            int8_note = {"encoder": int8_data.encoder, "load_or_build_s":
                         round(time.monotonic() - t, 1),
                         "item_vector_cosine_vs_fp32": {"mean": float(cos.mean()),
                                                        "min": float(cos.min()),
                                                        "p01": float(np.quantile(cos, 0.01))},
                         "note": "int8 item vectors for catalogue and history alike; the "
                                 "same user tower and ranker (trained on fp32 vectors)"}
            builders["crossrec_int8"] = lambda: CrossrecSystem(int8_data, tower, ranker,
                                                               "crossrec_int8")
    if ranker_meta is None:
        log.warning("no ranker in %s: crossrec systems skipped", repo)
        builders.pop("crossrec")
    results, timings = {}, {}
    runs = [name for name in systems if name in builders]
    # The bar counts (system, setting) runs; log lines print above it.
    with logging_redirect_tqdm(), tqdm(total=len(runs) * len(cases), desc="evaluation",
                                       unit="run", disable=None) as bar:
        for name in runs:
            bar.set_postfix_str(name)
            t = time.monotonic()
            system = builders[name]()
            build_s = time.monotonic() - t
            results[name], timings[name] = {}, {"build_s": round(build_s, 1)}
            for key, cs in cases.items():
                t = time.monotonic()
                results[name][key] = evaluate_system(system, cs, data)
                timings[name][key] = round(time.monotonic() - t, 1)
                m = results[name][key]["pooled"]
                log.info("%-24s %-7s HR@10 %.4f NDCG@10 %.4f R@20 %.4f MRR %.4f "
                         "(%d cases, %.0fs)", name, key, m["hr@10"], m["ndcg@10"],
                         m["recall@20"], m["mrr"], m["n"], timings[name][key])
                bar.update()
    targets = targets_report(results)
    report = {
        "command": " ".join(["python -m export.evaluate"] + sys.argv[1:]),
        "git_sha": _git_sha(), "cpus": os.cpu_count(), "python": _platform.python_version(),
        "dataset": dataset, "seed": seed, "top_k": TOP_K, "candidates": n_cands,
        "validation_users": len(val_users), "cases": {k: len(v) for k, v in cases.items()},
        "models": models, "item_encoder": data.encoder, "int8": int8_note,
        "protocols": {
            "A": "leave-last-out per platform over all rows (seq_index order); input = every "
                 "earlier event on both platforms (warm) or without the target platform's "
                 "events (cold); full ranking over the target platform's catalogue",
            "B": "URLLM (arXiv 2406.03085 Table 3): input = role=history rows, target = each "
                 "role=heldout_target row, full ranking over its platform's catalogue, pooled",
        },
        "metrics": {"hr@10": "target in top 10", "ndcg@10": "1/log2(rank+1) if rank <= 10",
                    "recall@20": "HR@20 (one target)", "mrr": "1/full rank (exact)",
                    "coverage@10": "distinct top-10 items over cases / catalogue size",
                    "novelty@10": "mean -log2((count+1)/(total+catalogue)) of top-10 items, "
                                  "training-user counts of the platform",
                    "ild@10": "mean pairwise 1 - cosine of item text vectors in a top-10",
                    "ties": "broken by catalogue order (deterministic)"},
        "systems": {
            "crossrec": f"services.ranking.pipeline.rank, as served: user tower -> {n_cands} "
                        "candidates (the best by exact dot product, the last up to "
                        f"{n_cov} replaced by the user's best co-visit items) -> ranker; "
                        "every other item after them by dot product",
            "crossrec_retrieval_only": "user tower for_platform vector, dot over catalogue",
            "fusion_untrained": "services.fusion.model.BaselineUserModel (time-decayed mean "
                                "pooling of the last 50 events; ignores the target platform)",
            "popularity": "training users' event counts per item of the target platform",
            "text_similarity": "mean of all input events' item text vectors (no training)",
            "als": f"implicit {_implicit_version()} ALS {ALS_PARAMS} on training users' "
                   "(user, item) events; validation queries folded in by the exact ALS user "
                   "step (recalculate_user) from their input events only; params: best of a "
                   "small grid on these validation users (A warm NDCG@10), i.e. flattered",
            "itemknn": "item-based CF: summed co-visit counts (training users who had both "
                       "items) with the query's distinct input items / sqrt(item's users + 1); "
                       "damping exponent best of 0-0.8 on these validation users (flattered)",
            "crossrec_int8": "crossrec with item vectors from the int8 encoder",
        },
        "published_protocol_b": {k: {"hr@10": v[0], "ndcg@10": v[1]}
                                 for k, v in PUBLISHED.items()},
        "targets": targets, "results": results, "timings_s": timings,
        "total_s": round(time.monotonic() - t0, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out_dir / "eval.png")
    log.info("results:\n%s", _table(results))
    log.info("targets: %s", json.dumps(targets, indent=1))
    log.info("wrote %s and eval.png (total %.0fs)", out_dir / "eval.json", report["total_s"])
    return report


def _implicit_version() -> str:
    try:
        import implicit
        return implicit.__version__
    except ImportError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repo", default=os.environ.get("CROSSREC_MODEL_REPO", "models"))
    parser.add_argument("--dataset", default=AMAZON)
    parser.add_argument("--users", type=int, default=None,
                        help="evaluate the first N validation users (default: all)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-baseline", action="store_true",
                        help="stand the untrained baseline in for a missing user tower "
                             "(development only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    rk.limit_blas_threads()
    run(args.model_repo, args.users, Path(args.out_dir), tuple(args.systems.split(",")),
        args.dataset, args.seed, args.allow_baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
