"""Ranker export and offline evaluation: metrics on hand-made ranks, leak-free cases, ONNX
parity."""

import json

import numpy as np
import pytest

from export import candidates, metrics, ranker_training
from export import rank_data as rd
from export import ranker as rk
from export import user_data as ud
from export.cases import build_cases
from export.evaluate import evaluate_system
from recmodel.ortsession import ort_session
from recmodel.features import N_FEATURES, UserContext

ARTS, OFFICE = "arts_crafts", "office"


# ---------------------------------------------------------------------------- metrics

def test_hit_rate_ndcg_and_mrr_follow_their_definitions_on_hand_made_ranks():
    ranks = np.array([1, 2, 10, 11, np.inf])
    assert metrics.hit_rate(ranks, 10) == pytest.approx(3 / 5)
    assert metrics.hit_rate(ranks, 20) == pytest.approx(4 / 5)
    assert metrics.hit_rate(ranks, 1) == pytest.approx(1 / 5)
    expected = (1 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(11)) / 5
    assert metrics.ndcg(ranks, 10) == pytest.approx(expected)
    assert metrics.mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 0) / 5)


def test_ranks_from_lists_marks_a_missing_target_as_unranked():
    ranks = metrics.ranks_from_lists([["a", "b", "c"], ["x", "y"]], ["c", "z"])
    assert ranks[0] == 3 and np.isinf(ranks[1])


def test_coverage_counts_distinct_items_in_the_top_k_only():
    tops = [["a", "b", "c"], ["a", "d", "e"]]
    assert metrics.coverage(tops, catalogue_size=10, k=2) == pytest.approx(3 / 10)  # a, b, d
    assert metrics.coverage(tops, catalogue_size=10, k=3) == pytest.approx(5 / 10)


def test_novelty_is_the_mean_negative_log2_share():
    share = {"a": 0.5, "b": 0.25}.get
    assert metrics.novelty([["a", "b"]], share, k=2) == pytest.approx((1 + 2) / 2)


def test_intra_list_diversity_is_zero_for_identical_items_and_one_for_orthogonal():
    same = np.ones((3, 4), np.float32)
    ortho = np.eye(3, 4, dtype=np.float32)
    assert metrics.intra_list_diversity([same]) == pytest.approx(0.0, abs=1e-6)
    assert metrics.intra_list_diversity([ortho]) == pytest.approx(1.0)
    # Two lists average; a one-item list has no pairs and is skipped.
    assert metrics.intra_list_diversity([same, ortho, ortho[:1]]) == pytest.approx(0.5)


def test_top_and_rank_break_ties_by_catalogue_order_and_agree_with_each_other():
    scores = np.array([[0.5, 0.9, 0.5, 0.1, 0.9]])
    top, ranks = candidates.top_and_rank(scores, 4, np.array([2]))
    assert top.tolist() == [[1, 4, 0, 2]]
    assert ranks.tolist() == [4]
    _, last = candidates.top_and_rank(scores, 2, np.array([3]))
    assert last.tolist() == [5]


def test_rerank_keeps_retrieval_rank_below_the_candidates():
    cands = np.array([[10, 11, 12], [10, 11, 12]])
    scores = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]], np.float32)
    ranks = metrics.rerank_ranks(scores, np.array([1, 57]), cands, np.array([10, 99]))
    assert ranks.tolist() == [3, 57]


# ---------------------------------------------------------------------------- cases

def _tiny_data() -> rd.RankData:
    """Two users, items unique per event, so a leaked target would show as an input item."""
    ids = [(ARTS, f"a{i}") for i in range(20)] + [(OFFICE, f"o{i}") for i in range(20)]
    vecs = np.random.default_rng(0).standard_normal((len(ids), 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    vocab = {ud.UNKNOWN_PLATFORM: 0, ARTS: 1, OFFICE: 2}
    row = {k: i for i, k in enumerate(ids)}

    def seq(user, events, n_history):
        items = np.array([row[e] for e in events], np.int64)
        plats = np.array([vocab[p] for p, _ in events], np.int64)
        return ud.UserSeq(user, items, plats, np.full(len(items), 7, np.int64),
                          np.ones(len(items), np.float32), n_history)

    u1 = seq("u1", [(ARTS, "a0"), (OFFICE, "o0"), (ARTS, "a1"), (OFFICE, "o1"), (ARTS, "a2"),
                    (OFFICE, "o2"), (ARTS, "a3")], n_history=5)
    u2 = seq("u2", [(OFFICE, "o5"), (ARTS, "a5"), (OFFICE, "o6"), (OFFICE, "o7"),
                    (ARTS, "a6")], n_history=3)
    counts = np.zeros(len(ids))
    # u1 trains; cases are built for both (build_cases reads the validation sequences).
    split = ud.Split(ud.SPLIT_USERS, vocab, [u1], [u1, u2], [])
    return rd.RankData("tiny-in-memory", ids, vecs, {"name": "test", "version": 0}, split,
                       counts)


@pytest.mark.parametrize("protocol", ["A", "B"])
@pytest.mark.parametrize("setting", ["warm", "cold"])
def test_build_cases_never_put_the_target_or_a_later_event_in_the_input(protocol, setting):
    data = _tiny_data()
    cases = build_cases(protocol, setting, ["u1", "u2"], data)
    assert cases
    by_id = {s.user_id: s for s in data.split.val}
    for c in cases:
        s = by_id[c.user_id]
        position = int(np.flatnonzero(s.items == c.query.target_row)[0])
        later = {data.ids[r][1] for r in s.items[position:]}
        inputs = [e["item_id"] for e in c.events]
        assert c.target not in inputs and not later & set(inputs)
        assert [data.ids[r][1] for r in c.query.rows] == inputs
        if protocol == "B":
            assert position >= s.n_history and len(c.query.rows) <= s.n_history


def test_cold_cases_have_no_event_on_the_target_platform():
    data = _tiny_data()
    for protocol in ("A", "B"):
        cases = build_cases(protocol, "cold", ["u1", "u2"], data)
        assert cases
        for c in cases:
            assert all(e["platform"] != c.platform for e in c.events)
            assert c.events  # the other platform is left


def test_protocol_a_targets_the_last_event_of_each_platform_and_warm_keeps_both():
    data = _tiny_data()
    cases = build_cases("A", "warm", ["u1"], data)
    assert sorted((c.platform, c.target) for c in cases) == [(ARTS, "a3"), (OFFICE, "o2")]
    office = next(c for c in cases if c.platform == OFFICE)
    assert [e["item_id"] for e in office.events] == ["a0", "o0", "a1", "o1", "a2"]


def test_protocol_b_targets_the_held_out_rows_given_the_history_rows():
    data = _tiny_data()
    cases = build_cases("B", "warm", ["u2"], data)
    assert [c.target for c in cases] == ["o7", "a6"]
    for c in cases:
        assert [e["item_id"] for e in c.events] == ["o5", "a5", "o6"]


def test_evaluate_system_accepts_a_plain_callable():
    data = _tiny_data()
    cases = build_cases("A", "warm", ["u1", "u2"], data)
    perfect = {(c.platform, tuple(e["item_id"] for e in c.events)): c.target for c in cases}

    def rank(events, platform):
        return [perfect[(platform, tuple(e["item_id"] for e in events))]]

    result = evaluate_system(rank, cases, data)
    assert result["pooled"]["hr@10"] == 1.0 and result["pooled"]["mrr"] == 1.0
    assert set(result) == {"pooled", ARTS, OFFICE}


# ---------------------------------------------------------------------------- export

torch = pytest.importorskip("torch")


def _tiny_ranker(seed=0):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = ranker_training.make_ranker(rng.standard_normal(N_FEATURES).astype(np.float32),
                           rng.uniform(0.5, 2.0, N_FEATURES).astype(np.float32), hidden=(8,))
    return model.eval(), rng


def test_ranker_export_matches_torch_for_any_batch_and_candidate_count(tmp_path):
    model, rng = _tiny_ranker()
    feats = rng.standard_normal((4, 23, N_FEATURES)).astype(np.float32)
    path, meta = rk.write_version(tmp_path, model, {"seed": 0}, [feats, feats[:1, :5]],
                                  np.eye(8, 4, dtype=np.float32))
    assert path == tmp_path / "ranker" / "1"
    on_disk = json.loads((path / "meta.json").read_text())
    assert on_disk["parity"]["max_abs_diff"] <= rk.PARITY_TOLERANCE
    assert on_disk["input_names"] == ["features"] and on_disk["output_names"] == ["scores"]
    assert on_disk["candidates"] == candidates.CANDIDATES and len(on_disk["features"]) == N_FEATURES
    session = ort_session(path / "model.onnx", 1)
    other = rng.standard_normal((3, 11, N_FEATURES)).astype(np.float32)
    got = rk.ort_scores(session, other)
    with torch.no_grad():
        want = model(torch.from_numpy(other)).numpy()
    assert got.shape == (3, 11) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=rk.PARITY_TOLERANCE)


def test_ranker_scores_raw_features_with_the_standardisation_inside():
    model, rng = _tiny_ranker()
    feats = rng.standard_normal((2, 5, N_FEATURES)).astype(np.float32)
    with torch.no_grad():
        raw = model(torch.from_numpy(feats))
        x = (torch.from_numpy(feats) - model.mean) / model.std
        manual = (model.mlp(x) + model.skip(x)).squeeze(-1)
    torch.testing.assert_close(raw, manual)


def test_ranker_export_writes_nothing_when_parity_fails(tmp_path, monkeypatch):
    model, rng = _tiny_ranker()
    monkeypatch.setattr(rk, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(RuntimeError, match="parity"):
        rk.write_version(tmp_path, model, {}, [rng.standard_normal((2, 3, N_FEATURES))
                                              .astype(np.float32)], np.eye(8, 4))
    assert not [p for p in (tmp_path / "ranker").iterdir()]


def test_batched_training_retrieval_equals_the_served_search_and_ranks_the_rest_after():
    data = _tiny_data()
    table = data.tables[ARTS]
    users = data.vecs[data.catalogue[ARTS][[0, 3]]]
    top = candidates.batch_retrieve(data, users, [ARTS, ARTS], 3)
    for user, rows in zip(users, top):
        assert rows.tolist() == table.snapshot.search(user, 3).tolist()
    scores = table.vectors @ users[0]
    by_dot = np.argsort(-scores, kind="stable")
    ctx = UserContext(ARTS, users[0], users[0])
    # Below the candidates the order is by dot product, skipping the candidates themselves.
    assert candidates.candidate_ranks(data, ctx, top[0], int(by_dot[5])) == 6
    assert candidates.candidate_ranks(data, ctx, top[0][::-1], int(top[0][0])) == 3
