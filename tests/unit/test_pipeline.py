"""The ranking pipeline (recmodel/pipeline.py): candidates, co-visit merge, features
by row, and the one-implementation property: the serving engine and the offline evaluation
rank the same user alike, list for list."""

import numpy as np
import pytest

from export.cases import build_cases, validation_users
from export.systems import CrossrecSystem
from export import rank_data as rd
from export import user_data as ud
from recmodel.user_model import BaselineUserModel, Window, encode_user
from recmodel import pipeline
from services.ranking.catalog import CatalogItem, MemoryCatalog
from recmodel.covisit import CoVisits
from services.ranking.engine import Popularity, RankingEngine
from recmodel.features import FEATURES, N_FEATURES, UserContext
from recmodel.index import EXACT, KINDS, PCA, PlatformIndex
from recmodel.ranker import Ranker

ARTS, OFFICE = "arts_crafts", "office"
KEYS = [(ARTS, f"a{i}") for i in range(6)] + [(OFFICE, f"o{i}") for i in range(6)]
DIM = 8


def _unit(n, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _table(platform, keys, covisit, counts=None, vectors=None):
    ids = [i for p, i in keys if p == platform]
    index = PlatformIndex(DIM)
    index.upsert(ids, _unit(len(ids)) if vectors is None else vectors)
    return pipeline.item_table(platform, index.snapshot(),
                               np.zeros(len(ids)) if counts is None else counts, covisit)


def test_merge_puts_covisit_rows_in_place_of_the_last_dense_ones():
    dense = [0, 1, 2, 3, 4, 5]
    assert pipeline.merge_candidates(dense, [10, 0, 11], 5, 2).tolist() == [0, 1, 2, 10, 11]
    # Too few co-visit rows: the dense list fills up; nothing appears twice.
    assert pipeline.merge_candidates(dense, [4], 5, 2).tolist() == [0, 1, 2, 4, 3]
    assert pipeline.merge_candidates(dense, [], 5, 2).tolist() == dense[:5]
    assert pipeline.merge_candidates(dense[:2], [10], 5, 2).tolist() == [0, 1, 10]


def test_covisit_top_keeps_positive_scores_of_live_unblocked_rows_ties_by_row():
    users = [np.array([0, 6, 7]), np.array([0, 6]), np.array([0, 8])]
    cv = CoVisits.from_users(KEYS, users)
    sums = cv.user_sums([(ARTS, "a0")], OFFICE)
    office = _table(OFFICE, KEYS, cv)
    # o0 twice; o1, o2 once each (tie by row); the table's rows are o0..o5 = 0..5.
    assert pipeline.covisit_top(cv, sums, office, 10).tolist() == [0, 1, 2]
    blocked = np.zeros(6, bool)
    blocked[0] = True
    assert pipeline.covisit_top(cv, sums, office, 10, blocked).tolist() == [1, 2]
    assert pipeline.covisit_top(cv, sums, office, 1).tolist() == [0]
    assert pipeline.covisit_top(cv, sums, _table(ARTS, KEYS, cv), 10).tolist() == []
    assert pipeline.covisit_top(cv, sums, office, 0).tolist() == []


def test_covisit_top_skips_items_deleted_from_the_catalogue():
    cv = CoVisits.from_users(KEYS, [np.array([0, 6, 7])])
    index = PlatformIndex(DIM)
    index.upsert([i for p, i in KEYS if p == OFFICE], _unit(6))
    index.delete(["o0"])
    table = pipeline.item_table(OFFICE, index.snapshot(), np.zeros(6), cv)
    sums = cv.user_sums([(ARTS, "a0")], OFFICE)
    assert pipeline.covisit_top(cv, sums, table, 10).tolist() == [1]


def test_covisit_top_equals_a_full_sort_when_it_sorts_only_the_best_few():
    rng = np.random.default_rng(6)
    cv = CoVisits.from_users(KEYS, [rng.choice(len(KEYS), size=6) for _ in range(300)])
    sums = cv.user_sums([(ARTS, "a0"), (OFFICE, "o1")], OFFICE)
    office = _table(OFFICE, KEYS, cv)
    rows = np.flatnonzero(cv.codes == cv.platform_code(OFFICE))
    score = (sums.same + sums.other)[rows] / np.sqrt(sums.deg[rows] + 1)
    full = [int(office.row_of_covisit[r]) for r in rows[np.lexsort((rows, -score))]
            if score[rows.tolist().index(r)] > 0]
    for m in range(1, 7):
        assert pipeline.covisit_top(cv, sums, office, m).tolist() == full[:m]


def test_item_table_popularity_is_over_live_rows_only():
    index = PlatformIndex(DIM)
    index.upsert(["x", "y", "z"], _unit(3))
    index.delete(["y"])
    table = pipeline.item_table(OFFICE, index.snapshot(), np.array([5.0, 99.0, 1.0]), None)
    assert table.log_pop.tolist() == pytest.approx([np.log1p(5), 0.0, np.log1p(1)])
    assert table.pop_pct.tolist() == [1.0, 0.0, 0.0]


def _user(table, history_keys, vectors):
    return UserContext(table.platform, vectors[0], vectors[1], {ARTS: vectors[2]},
                       {ARTS: 2}, history_keys, vectors[3:3 + len(history_keys)])


def test_features_mark_seen_items_by_row_and_gather_popularity_by_row():
    cv = CoVisits.from_users(KEYS, [np.array([0, 1, 6])])
    table = _table(ARTS, KEYS, cv, counts=np.arange(6, dtype=float))
    user = _user(table, [(ARTS, "a1"), (OFFICE, "o0")], _unit(5, seed=3))
    cands = pipeline.candidates(user, table, cv, 4, 1)
    x = pipeline.features(user, table, cands, cv)
    assert x.shape == (len(cands.rows), N_FEATURES)
    seen = x[:, FEATURES.index("seen")]
    assert seen.tolist() == [1.0 if r == 1 else 0.0 for r in cands.rows]
    assert x[:, FEATURES.index("log_pop")].tolist() == pytest.approx(
        table.log_pop[cands.rows].tolist())
    excluded = pipeline.candidates(user, table, cv, 6, 1, exclude_seen=True)
    assert 1 not in excluded.rows.tolist() and len(excluded.rows) == 5


def test_every_index_kind_returns_exact_scores_in_order_ties_by_row():
    vecs = _unit(300, seed=2)
    vecs[7] = vecs[3]  # a tie: row 3 comes first
    for kind in KINDS:
        index = PlatformIndex(DIM, kind, projection=rd.retrieval_projection(vecs, 4))
        index.upsert([str(i) for i in range(300)], vecs)
        rows = index.snapshot().search(vecs[3], 10)
        scores = vecs[rows] @ vecs[3]
        assert rows[:2].tolist() == [3, 7]
        assert (np.diff(scores) <= 0).all()


def test_pca_search_is_the_same_for_a_catalogue_loaded_in_batches_or_at_once():
    vecs = _unit(2000, seed=4)
    projection = rd.retrieval_projection(vecs, 4)
    ids = [str(i) for i in range(2000)]
    at_once = PlatformIndex(DIM, PCA, projection=projection)
    at_once.upsert(ids, vecs)
    batched = PlatformIndex(DIM, PCA, projection=projection)
    for b0 in (0, 7, 700, 1999):
        end = {0: 7, 7: 700, 700: 1999, 1999: 2000}[b0]
        batched.upsert(ids[b0:end], vecs[b0:end])
    a, b = at_once.snapshot(), batched.snapshot()
    assert np.array_equal(a.projected, b.projected)
    for q in _unit(20, seed=5):
        assert np.array_equal(a.search(q, 50), b.search(q, 50))


def test_a_repeated_id_in_one_upsert_keeps_the_last_and_one_row():
    index = PlatformIndex(DIM)
    vecs = _unit(3)
    index.upsert(["a", "a", "b"], vecs)
    snap = index.snapshot()
    assert len(snap) == 2 and snap.row_of["a"] == 1
    assert sorted(snap.ids[r] for r in snap.search(vecs[1], 10)) == ["a", "b"]


class _LinearRanker(Ranker):
    """A stand-in for the ONNX ranker with the same interface: a fixed linear score."""
    name, version, meta, explains, projection = "linear", 1, {}, True, None
    candidates, covisit_candidates, history_events = 8, 3, 50

    def __init__(self, covisit):
        self.covisit = covisit
        self.w = np.random.default_rng(9).standard_normal(N_FEATURES).astype(np.float32)

    def score(self, features):
        return features @ self.w


def _tiny_data():
    ids = [(ARTS, f"a{i}") for i in range(20)] + [(OFFICE, f"o{i}") for i in range(20)]
    vecs = _unit(len(ids), seed=5)
    vocab = {ud.UNKNOWN_PLATFORM: 0, ARTS: 1, OFFICE: 2}
    rng = np.random.default_rng(1)

    def seq(user, n):
        items = rng.choice(len(ids), size=n, replace=False)
        plats = np.array([vocab[ids[r][0]] for r in items], np.int64)
        return ud.UserSeq(user, items.astype(np.int64), plats, np.full(n, 7, np.int64),
                          np.ones(n, np.float32), n - 2)

    seqs = [seq(f"u{i}", 6 + i % 5) for i in range(30)]
    counts = rng.integers(0, 9, len(ids)).astype(float)
    split = ud.Split(ud.SPLIT_USERS, vocab, seqs[:20], seqs[20:], [])
    return rd.RankData("tiny-in-memory", ids, vecs, {"name": "test", "version": 0}, split,
                       counts)


@pytest.mark.parametrize("setting", ["warm", "cold"])
def test_the_serving_engine_and_the_offline_evaluation_give_identical_lists(setting):
    data = _tiny_data()
    model = BaselineUserModel()
    ranker = _LinearRanker(data.covisit)
    catalog = MemoryCatalog(DIM, index=EXACT)
    catalog._apply_upsert([CatalogItem(i, p, f"t{i}") for p, i in data.ids], data.vecs)

    class Stats:
        def __call__(self, platform):
            return [(i, int(data.counts[data.row_of[(platform, i)]]), 0)
                    for p, i in data.ids if p == platform]

    popularity = Popularity(Stats(), catalog, 3600)
    popularity.refresh()
    cases = build_cases("A", setting, validation_users(data), data)

    def profile(user_id, platform, session, recent_limit, budget_s, item_vectors=True):
        case = next(c for c in cases if c.case_id == user_id)
        ctx = rd.user_context(model, data, case.query)
        from services.common.remote import RemoteProfile
        return RemoteProfile(True, ctx.for_platform, ctx.fused, ctx.per_platform, ctx.counts,
                             {}, [(p, i, "") for p, i in ctx.history_keys],
                             ctx.history_vectors)

    engine = RankingEngine(catalog, None, profile, ranker, popularity)
    offline = CrossrecSystem(data, model, ranker)
    tops, _ = offline.rank_cases(cases)
    assert cases
    for case, top in zip(cases, tops):
        served = engine.recommend(case.case_id, case.platform, k=8)
        assert [r.item_id for r in served.items] == top[:8]


def test_encode_user_is_the_layout_fusion_serves():
    vecs = _unit(4, seed=8)
    from recmodel.events import Event
    events = [Event(f"e{i}", "u", p, 7, f"i{i}", "", i, 1.0)
              for i, p in enumerate([ARTS, OFFICE, ARTS, OFFICE])]
    user = encode_user(BaselineUserModel(), Window(events, vecs), OFFICE)
    assert user.platforms == [ARTS, OFFICE]
    assert set(user.per_platform) == {ARTS, OFFICE}
    assert user.for_platform is not None and user.for_platform_weights is not None
    alone, _ = BaselineUserModel().encode([Window(events[1::2], vecs[1::2])], [OFFICE])
    assert np.array_equal(user.per_platform[OFFICE], alone[0])


def test_recommend_reads_history_vectors_from_the_catalogue_and_asks_fusion_only_for_others():
    data = _tiny_data()
    ranker = _LinearRanker(data.covisit)
    catalog = MemoryCatalog(DIM, index=EXACT)
    catalog._apply_upsert([CatalogItem(i, p, f"t{i}") for p, i in data.ids], data.vecs)
    popularity = Popularity(lambda platform: [], catalog, 3600)
    from services.common.remote import RemoteProfile
    calls = []

    def profile(user_id, platform, session, recent_limit, budget_s, item_vectors=True):
        calls.append(item_vectors)
        recent = [(ARTS, "a1", ""), (OFFICE, user_id, "")]  # user_id names the 2nd item
        vectors = _unit(2, seed=11) if item_vectors else None
        return RemoteProfile(True, data.vecs[0], data.vecs[1], {ARTS: data.vecs[2]}, {ARTS: 1},
                             {}, recent, vectors)

    engine = RankingEngine(catalog, None, profile, ranker, popularity)
    engine.recommend("o3", OFFICE, k=3)           # both items listed: one call, no vectors
    assert calls == [False]
    engine.recommend("not-listed", OFFICE, k=3)   # one item unknown here: asked again
    assert calls == [False, False, True]
