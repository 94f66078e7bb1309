"""The train / validation / test split (export/user_data.py): leave-one-out by time for data
without its own held-out targets, the user split for data with them; event order as fusion
keeps it; the evaluation's cases on each part; a dataset given as a path."""

import csv

import numpy as np
import pytest

from dataio import dataset_dir, dataset_name, to_event
from export import rank_data as rd
from export import user_data as ud
from export.cases import build_cases, held_out_users, validation_users
from export.evaluate import case_sets

ITEMS = [f"m{i}" for i in range(8)]


def _write(folder, events: list[dict]) -> str:
    folder.mkdir()
    with open(folder / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "platform", "title", "genres"])
        w.writerows([[i, "movies", f"title {i}", "Drama"] for i in ITEMS])
    with open(folder / "events.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(events[0]))
        w.writeheader()
        w.writerows(events)
    return str(folder)


def _rated(user, item, rating, t):
    return {"user_id": user, "platform": "movies", "item_id": item,
            "rating_or_action": str(rating), "timestamp": str(t)}


@pytest.fixture
def movies(tmp_path):
    """u1: 6 events, two of them in the same second (file order m3 before m2); u2: 2 events."""
    events = [_rated("u1", "m0", 5, 100), _rated("u1", "m1", 3, 200),
              _rated("u1", "m3", 4, 300), _rated("u1", "m2", 2, 300),
              _rated("u1", "m5", 1, 400), _rated("u1", "m4", 5, 500),
              _rated("u2", "m7", 4, 100), _rated("u2", "m6", 4, 150)]
    return _write(tmp_path / "tiny-movies", events), events


def _data(dataset) -> rd.RankData:
    ids = [("movies", i) for i in ITEMS]
    users, missing = ud.load_sequences(dataset, ids)
    assert missing == 0
    vecs = np.eye(len(ids), 4, dtype=np.float32) + 0.1
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    split = ud.split_sequences(users)
    return rd.RankData(dataset_name(dataset), ids, vecs, {"name": "test", "version": 0}, split,
                       ud.item_counts(split.train, len(ids)))


def _u1_rows(path) -> list[int]:
    """u1's catalogue rows in load_sequences' order."""
    users, _ = ud.load_sequences(path, [("movies", i) for i in ITEMS])
    return [e[1] for e in next(u for u in users if u["user_id"] == "u1")["events"]]


def test_a_dataset_is_a_name_under_the_data_folder_or_a_path(movies):
    path, _ = movies
    assert dataset_dir(path).name == "tiny-movies" and dataset_name(path) == "tiny-movies"
    assert dataset_dir("movielens-1m").name == "movielens-1m"


def test_events_are_ordered_as_fusion_orders_a_profile_ties_included(movies):
    path, events = movies
    users, _ = ud.load_sequences(path, [("movies", i) for i in ITEMS])
    u1 = next(u for u in users if u["user_id"] == "u1")
    served = sorted((to_event(e, {}) for e in events if e["user_id"] == "u1"),
                    key=lambda e: (e["event_time_ms"], e["event_id"]))
    assert [ITEMS[e[1]] for e in u1["events"]] == [e["item_id"] for e in served]


def test_leave_one_out_by_time_holds_out_the_last_two_events_of_each_user(movies):
    path, _ = movies
    data = _data(path)
    split = data.split
    assert split.rule == ud.SPLIT_LAST
    by = {p: {s.user_id: s for s in getattr(split, p)} for p in ("train", "val", "test")}
    order = _u1_rows(path)
    t1, v1, s1 = by["train"]["u1"], by["val"]["u1"], by["test"]["u1"]
    assert t1.items.tolist() == order[:4] and t1.n_history == 4
    assert v1.items.tolist() == order[:5] and v1.n_history == 4
    assert s1.items.tolist() == order and s1.n_history == 5
    assert sorted(s1.weights.tolist()) == [1, 2, 3, 4, 5, 5]  # ratings are the weights
    # Under 3 events: training only; counts and co-visits see the training part alone.
    assert "u2" in by["train"] and "u2" not in by["val"] and "u2" not in by["test"]
    assert data.counts[order[4]] == 0 and data.counts[order[5]] == 0
    assert validation_users(data) == held_out_users(data, "test") == ["u1"]


def test_cases_of_each_part_predict_its_target_from_earlier_events_only(movies):
    path, _ = movies
    data = _data(path)
    order = _u1_rows(path)
    (val,) = build_cases("A", "warm", ["u1"], data, "val")
    (test,) = build_cases("A", "warm", ["u1"], data, "test")
    assert val.target == ITEMS[order[4]] and val.query.rows.tolist() == order[:4]
    assert test.target == ITEMS[order[5]] and test.query.rows.tolist() == order[:5]
    assert val.case_id != test.case_id
    # One platform: no cold setting and no protocol B; validation and test both evaluated.
    assert sorted(case_sets(data)) == ["A_warm", "A_warm_test"]


def test_data_with_its_own_held_out_targets_is_split_by_user(tmp_path):
    events = []
    for u in range(20):
        for j in range(4):
            events.append({"user_id": f"u{u:02d}", "platform": "movies",
                           "item_id": ITEMS[(u + j) % 8], "rating_or_action": "interact",
                           "timestamp": "", "seq_index": str(j),
                           "role": "heldout_target" if j == 3 else "history"})
    data = _data(_write(tmp_path / "roles", events))
    assert data.split.rule == ud.SPLIT_USERS and not data.split.test
    train = {s.user_id for s in data.split.train}
    val = {s.user_id for s in data.split.val}
    assert len(val) == 2 and not train & val and len(train | val) == 20
    assert all(s.n_history == 3 for s in data.split.val)


def test_movielens_test_figures_are_placed_against_the_published_band():
    from export.eval_report import targets_report

    def result(hr):
        return {"crossrec": {"A_warm_test": {"pooled": {"hr@10": hr, "ndcg@10": hr / 2,
                                                        "mrr": hr / 3, "n": 6040}}}}
    positions = [targets_report(result(hr), "movielens-1m")["test_vs_published_band"]["position"]
                 for hr in (0.13, 0.25, 0.35)]
    assert positions == ["below", "within", "above"]
    assert "test_vs_published_band" not in targets_report(result(0.25), "amazon-arts-office-urllm")
