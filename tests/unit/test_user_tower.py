"""User tower: the numpy pooling baseline, the torch model's contract, and ONNX export + parity."""

import json

import numpy as np
import pytest

from export import metrics
from export import user_data as ud
from recmodel.pooling import baseline_user_vec, rank_ages

torch = pytest.importorskip("torch")
from export import user_tower as ut  # noqa: E402
from export import user_tower_model as utm  # noqa: E402
from export import user_tower_training as utt  # noqa: E402

DIM = 8


def _unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def test_baseline_is_normalised_and_favours_recent_events():
    vecs = _unit(np.eye(3, DIM))
    out = baseline_user_vec(vecs, np.ones(3), rank_ages(3))
    assert out.shape == (DIM,) and out.dtype == np.float32
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-6)
    # ages 2, 1, 0: the newest event (last row) weighs most, with a 10-event half-life.
    assert out[2] > out[1] > out[0]
    assert out[1] / out[2] == pytest.approx(0.5 ** 0.1, rel=1e-5)


def test_baseline_weight_scales_an_event_and_zero_weight_drops_it():
    vecs = _unit(np.eye(2, DIM))
    heavy = baseline_user_vec(vecs, np.array([3.0, 1.0]), np.zeros(2))
    assert heavy[0] / heavy[1] == pytest.approx(3.0, rel=1e-5)
    dropped = baseline_user_vec(vecs, np.array([0.0, 1.0]), np.zeros(2))
    np.testing.assert_allclose(dropped, vecs[1], atol=1e-6)


def test_baseline_of_a_user_without_events_is_all_zeros_in_a_batch():
    vecs = _unit(np.random.default_rng(0).standard_normal((2, 4, DIM)))
    weights = np.array([[0, 0, 1, 1], [0, 0, 0, 0]], dtype=np.float32)
    out = baseline_user_vec(vecs, weights, np.tile(rank_ages(4), (2, 1)))
    assert np.linalg.norm(out[0]) == pytest.approx(1.0, abs=1e-6)
    assert not out[1].any()


def _tiny_model(seed=0, self_attention=True):
    torch.manual_seed(seed)
    cfg = utm.TrainConfig(d_model=16, heads=2, ffn=32, out_hidden=16,
                         self_attention=self_attention)
    model = utm.UserTower(DIM, 3, cfg)
    # Non-zero output layer so the learned path is exercised, not only the weighted mean.
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)
    return model.eval()


def _windows(lengths, width, seed=0):
    """Left-padded random ONNX feeds (numpy) with the given number of real events per row."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    feeds = {"item_vecs": np.zeros((b, width, DIM), np.float32),
             "platform_ids": np.zeros((b, width), np.int64),
             "action_ids": np.zeros((b, width), np.int64),
             "weights": np.zeros((b, width), np.float32),
             "ages": np.zeros((b, width), np.float32), "mask": np.zeros((b, width), np.float32),
             "target_platform": rng.integers(0, 3, b).astype(np.int64)}
    for r, n in enumerate(lengths):
        feeds["item_vecs"][r, width - n:] = _unit(rng.standard_normal((n, DIM)))
        feeds["platform_ids"][r, width - n:] = rng.integers(0, 3, n)
        feeds["action_ids"][r, width - n:] = 7
        feeds["weights"][r, width - n:] = rng.uniform(0.5, 3.0, n)
        feeds["ages"][r, width - n:] = rank_ages(n)
        feeds["mask"][r, width - n:] = 1.0
    return feeds


def _forward(model, feeds):
    with torch.no_grad():
        out = model(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in utm.INPUT_NAMES))
    return out[0].numpy(), out[1].numpy()


@pytest.mark.parametrize("self_attention", [True, False])
def test_forward_gives_unit_user_vectors_and_event_weights_summing_to_one(self_attention):
    feeds = _windows([1, 4, 6], width=6)
    user, weights = _forward(_tiny_model(self_attention=self_attention), feeds)
    assert user.shape == (3, DIM) and weights.shape == (3, 6)
    np.testing.assert_allclose(np.linalg.norm(user, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)
    assert (weights[feeds["mask"] == 0] == 0).all()
    assert (weights[feeds["mask"] == 1] > 0).all()


def test_left_padding_does_not_change_the_user_vector():
    model = _tiny_model()
    short = _windows([3, 5], width=5)
    wide = {k: v.copy() for k, v in _windows([3, 5], width=9).items()}
    for k, v in short.items():
        if v.ndim == 1:
            wide[k] = v
        else:
            wide[k][:, 9 - 5:] = v
            wide[k][:, :9 - 5] = 0
    u_short, w_short = _forward(model, short)
    u_wide, w_wide = _forward(model, wide)
    np.testing.assert_allclose(u_short, u_wide, atol=1e-5)
    np.testing.assert_allclose(w_short, w_wide[:, 4:], atol=1e-6)


@pytest.mark.parametrize("self_attention,max_events", [(True, 20), (False, 4)])
def test_training_examples_see_exactly_what_serving_feeds(self_attention, max_events):
    """The batched, masked training path and the ONNX-contract forward agree example by
    example, visible and hidden, so training optimises the model the service will call.
    (With self-attention they agree while the user's sequence fits in the window: beyond it,
    training lets an event attend to older events than the served window holds.)"""
    rng = np.random.default_rng(1)
    n_items, n = 40, 9
    item_vecs = _unit(rng.standard_normal((n_items, DIM)))
    seq = ud.UserSeq("u", rng.integers(0, n_items, n).astype(np.int64),
                     np.array([1, 2, 1, 1, 2, 2, 1, 2, 1], np.int64), np.full(n, 7, np.int64),
                     rng.uniform(0.5, 2.0, n).astype(np.float32), n_history=7)
    model = _tiny_model(seed=3, self_attention=self_attention)
    b = utt.batch_views(utt.train_arrays([seq]), np.array([0]), n_platforms=3,
                       max_events=max_events)
    x = torch.from_numpy(item_vecs)[b["items"]]
    v = b["n_views"]
    rep = lambda z: z.repeat(v, *([1] * (z.dim() - 1)))  # noqa: E731
    with torch.no_grad():
        h = model.encode(rep(x), rep(b["plats"]), rep(b["acts"]), b["sa_allowed"])
        user, _ = model.pool(h, rep(x), rep(b["plats"]), rep(b["wts"]), rep(b["plats"]),
                             b["allowed"], b["ages"], int_ages=True)
    expected = set()
    for view in range(v):  # one user, so the sequence index is the view
        for t in range(n):
            keep = np.arange(min(t, seq.n_history))
            if view:
                if seq.platforms[t] != view:
                    continue
                keep = keep[seq.platforms[keep] != view]
            keep = keep[-max_events:]
            if len(keep):
                expected.add((view, t))
                m = len(keep)
                feeds = {"item_vecs": item_vecs[seq.items[keep]][None],
                         "platform_ids": seq.platforms[keep][None],
                         "action_ids": seq.actions[keep][None],
                         "weights": seq.weights[keep][None], "ages": rank_ages(m)[None],
                         "mask": np.ones((1, m), np.float32),
                         "target_platform": seq.platforms[t:t + 1]}
                served, _ = _forward(model, feeds)
                np.testing.assert_allclose(user[view, t].numpy(), served[0], atol=1e-5)
    assert {tuple(q) for q in b["query"].tolist()} == expected
    assert len(expected) == 8 + 8  # visible: t = 1..8; hidden: 4 per platform


def test_ranks_count_ties_against_the_target_and_metrics_follow():
    item_vecs = _unit([[1, 0], [1, 0], [0, 1], [0.9, 0.1]])
    w = ud.Windows(*(np.zeros((2, 1), t) for t in (np.int64, np.int64, np.int64, np.float32,
                                                   np.float32, np.float32)),
                   target_platform=np.array([1, 1]), target_item=np.array([0, 2]))
    ranks = metrics.rank_of_targets(_unit([[1, 0], [1, 0]]), w, item_vecs, {1: np.arange(4)})
    assert ranks.tolist() == [2, 4]
    m = metrics.metrics_from_ranks(np.array([1, 3, 20]), k=10)
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / np.log2(4)) / 3)


def test_export_writes_a_version_that_matches_torch(tmp_path):
    model = _tiny_model()
    feeds = [_windows([1, 3, 7, 7], width=7), _windows([2, 1], width=3, seed=1)]
    path, meta = ut.write_version(tmp_path, model, {"dim": DIM}, feeds)
    assert path == tmp_path / "user_tower" / "1"
    assert json.loads((path / "meta.json").read_text())["parity"]["max_abs_diff"] <= 1e-4
    # A batch and an event count the export never saw (dynamic axes).
    other = _windows([5, 2, 11], width=11, seed=2)
    got = ut.ort_run(path / "model.onnx", other)
    want = _forward(model, other)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_export_writes_nothing_when_parity_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(ut, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(RuntimeError, match="parity"):
        ut.write_version(tmp_path, _tiny_model(), {"dim": DIM}, [_windows([2, 3], width=3)])
    assert not [p for p in (tmp_path / "user_tower").iterdir()]
