"""The systems the offline evaluation ranks with, each on a platform's whole catalogue: crossrec
as served (CrossrecSystem: user tower, candidates, ranker), the user tower alone, the untrained
pooling baseline, popularity, text similarity, ALS and item-based CF."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import numpy as np
from threadpoolctl import threadpool_limits

from dataio import AMAZON, MOVIELENS, dataset_name
from export import cli
from export.candidates import candidate_ranks, top_and_rank
from export.cases import Case, default_data
from export.item_vectors import item_vectors
from export.rank_data import Query, RankData, load_user_model, user_context
from export.ranker import MODEL_NAME as RANKER
from recmodel.modelrepo import resolve, versions
from recmodel.user_model import SERVED_THREADS, BaselineUserModel
from recmodel import pipeline
from recmodel.features import UserContext
from recmodel.ranker import OnnxRanker

log = logging.getLogger("export.evaluate")

INT8_ENCODER = "encoder_int8"
TOP_K = 100
SYSTEMS = ("crossrec", "crossrec_retrieval_only", "fusion_untrained", "popularity",
           "text_similarity", "als", "itemknn", "crossrec_int8")
BASELINES = ("fusion_untrained", "popularity", "text_similarity", "als", "itemknn")
# ALS on the training users' (user, item) counts: the best of a small grid on these same
# validation users (A warm NDCG@10), so the baseline is if anything flattered (the grid:
# bench/results/export-decisions.md).
ALS_PARAMS = {"factors": 256, "regularization": 30.0, "alpha": 40.0, "iterations": 15}
# The baselines' hyper-parameters per dataset, each the best of bench/baseline_grid.py's grid
# on that dataset's validation targets (A warm NDCG@10); the Amazon values are the defaults.
DATASET_ALS_PARAMS: dict[str, dict] = {
    MOVIELENS: {"factors": 64, "regularization": 1.0, "alpha": 40.0, "iterations": 15}}
ITEMKNN_DAMPING = 0.5
DATASET_ITEMKNN_DAMPING: dict[str, float] = {MOVIELENS: 0.7}


class CatalogueSystem:
    """Scores a platform's whole catalogue per query; ties broken by catalogue order."""

    name = "system"
    chunk = 256

    def __init__(self, data: RankData):
        self.data = data
        self._local = {p: {int(r): i for i, r in enumerate(rows)}
                       for p, rows in data.catalogue.items()}

    def score(self, queries: list[Query], platform: str) -> np.ndarray:
        """float [len(queries), catalogue size of platform]."""
        raise NotImplementedError

    def _rank_platform(self, queries, platform, targets):
        rows = self.data.catalogue[platform]
        top, ranks = top_and_rank(self.score(queries, platform), TOP_K, targets)
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
        q = Query(keep[0]["user_id"] if keep else "", np.array(
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
        users = np.stack([user_context(self.model, self.data, q).for_platform
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
        self.params = dict(params or DATASET_ALS_PARAMS.get(dataset_name(data.dataset), ALS_PARAMS))
        train = data.split.train
        rows = np.concatenate([np.full(len(s.items), u) for u, s in enumerate(train)])
        cols = np.concatenate([s.items for s in train])
        self._csr = csr_matrix
        matrix = csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                            shape=(len(train), len(data.ids)))
        matrix.sum_duplicates()
        cli.limit_blas_threads()  # scipy's OpenBLAS is loaded only now
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
    (its users + 1) ** damping (Amazon: .5, the best of 0, .3, .4, .5, .6, .7, .8 on its
    validation users, A warm: flattered like ALS; other datasets: DATASET_ITEMKNN_DAMPING);
    ties by popularity. The same counts as the ranker's
    co-visit features (recmodel/covisit.py)."""

    name = "itemknn"

    def __init__(self, data, damping: float | None = None):
        super().__init__(data)
        self.damping = (DATASET_ITEMKNN_DAMPING.get(dataset_name(data.dataset),
                                                   ITEMKNN_DAMPING)
                        if damping is None else damping)

    def score(self, queries, platform):
        rows = self.data.catalogue[platform]
        tie = 1e-6 * np.log1p(self.data.counts[rows])
        out = np.zeros((len(queries), len(rows)))
        for i, q in enumerate(queries):
            sums = self.data.covisit.sums(
                q.rows, np.array([self.data.ids[r][0] for r in q.rows], dtype=object), platform)
            out[i] = (sums.same + sums.other)[rows] / (sums.deg[rows] + 1) ** self.damping + tie
        return out


class CrossrecSystem(CatalogueSystem):
    """The served pipeline (recmodel/pipeline.rank) query by query, with the exported
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
                        candidate_ranks(data, ctx, ranked.rows, int(targets[i])))
        return np.stack(top), ranks

    def ranked(self, query: Query) -> tuple[UserContext, pipeline.Ranked]:
        """One query's user context and its whole ranked candidate list (table rows of the
        query's platform, scores), as the served Recommend computes them."""
        # One BLAS thread, as in the served processes (OPENBLAS_NUM_THREADS=1 in
        # services/ranking/server.py): the same kernels and splits, the same bits.
        with threadpool_limits(1, user_api="blas"):
            ctx = user_context(self.model, self.data, query)
            return ctx, pipeline.rank(ctx, self.data.tables[query.target_platform],
                                      self.ranker.covisit, self.ranker,
                                      self.ranker.candidates, self.ranker.covisit_candidates)


def int8_item_vectors(dataset: str = AMAZON, repo: str | os.PathLike = "models",
                      build: bool = True) -> tuple[list[tuple[str, str]], np.ndarray, int] | None:
    """Catalogue vectors from the highest int8 encoder (export.item_vectors, cached beside the
    fp32 ones) and its version; None when it is absent, or not cached and `build` is False."""
    found = versions(repo, INT8_ENCODER)
    if not found:
        return None
    vectors = item_vectors(dataset, repo, found[-1], INT8_ENCODER, build)
    return None if vectors is None else (*vectors, found[-1])


def load_ranker(repo: str | os.PathLike, version: int | None = None) -> OnnxRanker:
    """The exported ranker as serving loads it (recmodel/ranker.py)."""
    return OnnxRanker(resolve(repo, RANKER, version))


def rank_fn(system: str, repo: str | os.PathLike = "models", data: RankData | None = None):
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
    tower = load_user_model(repo, intra_op_threads=SERVED_THREADS)
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

