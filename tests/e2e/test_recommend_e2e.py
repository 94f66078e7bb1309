"""End to end on real models and real data: the three services as processes, a whole real
catalogue, real training users' events ingested over gRPC, and held-out cases ingested as
users of their own and ranked through Recommend. The offline evaluation (export/evaluate.py,
the same pipeline code), given the same item popularity, must give the same top-10 list and
the same scores for every case: the offline figures are the served system's.

Two datasets: the Amazon Arts/Office data with `make models`' models (validation cases, warm
and cold platform), and a MovieLens-1M sample given as a path to a folder in the shared
layout, with models the export stage trains on it here (test cases of the leave-one-out
split by time, ratings as weights)."""

import csv
import gzip
import subprocess
import sys
import time

import numpy as np
import pytest

from clients.crossrec_client import CrossrecClient, Item
from tools.stack import python_env, start_stack
from dataio import AMAZON, MOVIELENS, dataset_file, iter_events, item_texts, read_items, to_event
from export.cases import build_cases, default_data, held_out_users, validation_users
from export.evaluate import evaluate_system
from export.systems import rank_fn

CASES = 200            # cases per setting, every list compared
INGESTED_USERS = 1500  # training users whose events give the served popularity
K = 10
ML_SAMPLE_USERS = 500  # the MovieLens sample: its first users in file order (83k events)


def _cases(data, setting: str, users: list[str], part: str) -> list:
    """The first CASES protocol-A cases of `users`, in user order."""
    cases = []
    for user in users:
        cases += build_cases("A", setting, [user], data, part)
        if len(cases) >= CASES:
            return cases[:CASES]
    return cases


def _serve(run_dir, repo: str, dataset: str, data, cases: dict, ingested: set[str]):
    """Start the stack on `repo`, load `dataset`'s catalogue and the `ingested` users' events
    and every case's input; (client, procs, offline crossrec with the served popularity)."""
    procs = start_stack(run_dir, repo, extra={"ranking": ["--popularity-refresh-s", "1"]})
    client = CrossrecClient(embedding=procs["embedding"].address,
                            fusion=procs["fusion"].address,
                            ranking=procs["ranking"].address, timeout_s=300)
    try:
        items = read_items(dataset)
        for start in range(0, len(items), 1000):
            client.ranking.upsert_items([Item(r["item_id"], r["platform"], r["title"],
                                              r["attributes"]) for r in items[start:start + 1000]])
        texts = item_texts(dataset)
        events = [to_event(row, texts) for row in iter_events(dataset)
                  if row["user_id"] in ingested]
        events += [e for cs in cases.values() for c in cs for e in c.events]
        assert client.fusion.ingest_stream(events).accepted == len(events)
        counts = np.zeros(len(data.ids))
        for e in events:
            counts[data.row_of[(e["platform"], e["item_id"])]] += 1
        time.sleep(4)  # ranking re-reads popularity every second
        # The offline side sees the same popularity (every ingested event counts).
        return client, procs, rank_fn("crossrec", repo, data.with_counts(counts))
    except BaseException:
        _stop(client, procs)
        raise


def _stop(client, procs):
    client.close()
    codes = {n: p.stop() for n, p in reversed(list(procs.items()))}
    assert set(codes.values()) == {0}, codes


@pytest.fixture(scope="module")
def amazon(model_repo, tmp_path_factory):
    """The Amazon stack: validation cases, warm and cold platform."""
    data = default_data(str(model_repo))
    cases = {s: _cases(data, s, validation_users(data), "val") for s in ("warm", "cold")}
    ingested = set(sorted(data.train_ids)[:INGESTED_USERS])
    client, procs, offline = _serve(tmp_path_factory.mktemp("e2e"), str(model_repo), AMAZON,
                                    data, cases, ingested)
    yield client, data, cases, offline
    _stop(client, procs)


def _movielens_sample(folder) -> str:
    """The first ML_SAMPLE_USERS users of MovieLens-1M and its whole catalogue, written as a
    dataset folder in the shared layout (never inside the repository)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = dataset_file(MOVIELENS, "events.csv")
    users: set[str] = set()
    with gzip.open(src, "rt", encoding="utf-8", newline="") as f, \
            gzip.open(folder / "events.csv.gz", "wt", encoding="utf-8", newline="") as out:
        reader = csv.DictReader(f)
        writer = csv.DictWriter(out, reader.fieldnames)
        writer.writeheader()
        for row in reader:
            if row["user_id"] not in users and len(users) >= ML_SAMPLE_USERS:
                break
            users.add(row["user_id"])
            writer.writerow(row)
    (folder / "items.csv").write_bytes(dataset_file(MOVIELENS, "items.csv").read_bytes())
    return str(folder)


def _export(module: str, repo, dataset: str, *args: str) -> None:
    """`python -m export.<module>` as `make models DATASET=<dataset>` runs it."""
    subprocess.run([sys.executable, "-m", f"export.{module}", "--model-repo", str(repo),
                    "--dataset", dataset, *args], check=True, env=python_env(), timeout=900)


@pytest.fixture(scope="module")
def movielens(model_repo, tmp_path_factory):
    """The MovieLens-sample stack: models trained here on the sample (the encoder of
    `make models`, linked), test cases of the first users, the others' events ingested."""
    root = tmp_path_factory.mktemp("e2e-movielens")
    dataset = _movielens_sample(root / "movielens-sample")
    repo = root / "models"
    repo.mkdir()
    for name in ("encoder", "encoder_int8"):
        (repo / name).symlink_to(model_repo / name, target_is_directory=True)
    _export("user_tower", repo, dataset, "--epochs", "1")
    _export("ranker", repo, dataset, "--epochs", "2")
    data = default_data(str(repo), dataset)
    users = held_out_users(data, "test")
    cases = {"warm": _cases(data, "warm", users, "test")}
    case_users = {c.user_id for c in cases["warm"]}
    ingested = {u for u in users if u not in case_users}
    client, procs, offline = _serve(root / "run", str(repo), dataset, data, cases, ingested)
    yield client, data, cases, offline
    _stop(client, procs)


def _lists(cases, tops):
    """Ranked lists as the rank function evaluate_system takes."""
    by_events = {id(c.events): list(t[:K]) for c, t in zip(cases, tops)}
    return lambda events, platform: by_events[id(events)]


def _compare(served, setting, label, capsys):
    client, data, cases, offline = served
    cases = cases[setting]
    assert len(cases) == CASES
    off_tops, _ = offline.rank_cases(cases)
    answers = [client.ranking.recommend(c.case_id, c.platform, k=K) for c in cases]
    on_tops = [[r.item_id for r in recs] for recs in answers]
    differing = [c.case_id for c, a, b in zip(cases, off_tops, on_tops) if a[:K] != b]
    # Stronger than the lists: every score, bit for bit (a float32 on the wire), so a
    # difference that moves no list on this model's scores shows here too.
    off_scores = [offline.ranked(c.query)[1].scores[:K] for c in cases]
    other_scores = [c.case_id for c, s, recs in zip(cases, off_scores, answers)
                    if not np.array_equal(s, np.array([r.score for r in recs], np.float32))]
    on = evaluate_system(_lists(cases, on_tops), cases, data)["pooled"]
    off = evaluate_system(_lists(cases, off_tops), cases, data)["pooled"]
    with capsys.disabled():
        print(f"\n[e2e {label} {setting}] {len(cases)} cases: {len(cases) - len(differing)} "
              f"identical top-{K} lists; HR@10/NDCG@10 offline {off['hr@10']:.4f}/"
              f"{off['ndcg@10']:.4f}, served over gRPC {on['hr@10']:.4f}/{on['ndcg@10']:.4f}")
    assert not differing, f"{len(differing)} lists differ, e.g. {differing[:3]}"
    assert not other_scores, f"{len(other_scores)} lists' scores differ, e.g. {other_scores[:3]}"
    assert on["ndcg@10"] == off["ndcg@10"]


@pytest.mark.parametrize("setting", ["warm", "cold"])
def test_served_recommend_equals_the_offline_evaluation_list_for_list(amazon, setting, capsys):
    _compare(amazon, setting, "amazon", capsys)


def test_movielens_served_recommend_equals_the_offline_evaluation(movielens, capsys):
    _compare(movielens, "warm", "movielens-sample", capsys)


def test_movielens_models_name_their_data_and_split(movielens):
    _, _, _, offline = movielens
    for meta in (offline.ranker.meta, offline.model.meta):
        assert meta["dataset"] == "movielens-sample"
        assert meta["split"]["rule"] == "last"


def test_a_held_out_user_gets_real_recommendations_with_explanations(amazon):
    client, data, cases, _ = amazon
    case = next(c for c in cases["warm"] if c.platform == "office")
    recs = client.ranking.recommend(case.case_id, "office", k=5)
    assert len(recs) == 5 and all(r.title and r.explanation for r in recs)
    assert recs.source == "personalised"
    session = [dict(e, user_id="", event_id="") for e in case.events[-50:]]
    anonymous = client.ranking.recommend("", "office", k=5, session_events=session)
    assert len(anonymous) == 5 and all(r.title for r in anonymous)
