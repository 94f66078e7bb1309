"""End to end on the real model and the real data: the three services as processes, the whole
Amazon Arts/Office catalogue, real training users' events ingested over gRPC, and held-out
validation cases ingested as users of their own and ranked through Recommend. The offline
evaluation (export/evaluate.py, the same pipeline code), given the same item popularity, must
give the same top-10 list for every case: the offline figures are the served system's."""

import time

import numpy as np
import pytest

from clients.crossrec_client import CrossrecClient, Item
from clients.stack import start_stack
from dataio import AMAZON, iter_events, item_texts, read_items, to_event
from export.cases import build_cases, default_data, validation_users
from export.evaluate import evaluate_system
from export.systems import rank_fn

CASES = 200            # warm and cold-platform validation cases each, every list compared
INGESTED_USERS = 1500  # training users whose events give the served popularity
K = 10


def _cases(data, setting: str) -> list:
    """The first CASES protocol-A cases of the validation users, in user order."""
    users, cases = validation_users(data), []
    for user in users:
        cases += build_cases("A", setting, [user], data)
        if len(cases) >= CASES:
            return cases[:CASES]
    return cases


@pytest.fixture(scope="module")
def served(model_repo, tmp_path_factory):
    """The stack with the full catalogue, training users' events, and each validation case's
    input stored under the case's own user id."""
    data = default_data(str(model_repo))
    procs = start_stack(tmp_path_factory.mktemp("e2e"), str(model_repo),
                        extra={"ranking": ["--popularity-refresh-s", "1"]})
    client = CrossrecClient(embedding=procs["embedding"].address,
                            fusion=procs["fusion"].address,
                            ranking=procs["ranking"].address, timeout_s=300)
    try:
        items = read_items(AMAZON)
        for start in range(0, len(items), 1000):
            client.ranking.upsert_items([Item(r["item_id"], r["platform"], r["title"],
                                              r["attributes"]) for r in items[start:start + 1000]])
        texts = item_texts(AMAZON)
        ingested = set(sorted(data.train_ids)[:INGESTED_USERS])
        events = [to_event(row, texts) for row in iter_events(AMAZON)
                  if row["user_id"] in ingested]
        cases = {s: _cases(data, s) for s in ("warm", "cold")}
        events += [e for cs in cases.values() for c in cs for e in c.events]
        assert client.fusion.ingest_stream(events).accepted == len(events)
        counts = np.zeros(len(data.ids))
        for e in events:
            counts[data.row_of[(e["platform"], e["item_id"])]] += 1
        time.sleep(4)  # ranking re-reads popularity every second
        # The offline side sees the same popularity (every ingested event counts).
        offline = rank_fn("crossrec", str(model_repo), data.with_counts(counts))
        yield client, data, cases, offline
    finally:
        client.close()
        codes = {n: p.stop() for n, p in reversed(list(procs.items()))}
        assert set(codes.values()) == {0}, codes


def _lists(cases, tops):
    """Ranked lists as the rank function evaluate_system takes."""
    by_events = {id(c.events): list(t[:K]) for c, t in zip(cases, tops)}
    return lambda events, platform: by_events[id(events)]


@pytest.mark.parametrize("setting", ["warm", "cold"])
def test_served_recommend_equals_the_offline_evaluation_list_for_list(served, setting, capsys):
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
        print(f"\n[e2e {setting}] {len(cases)} cases: {len(cases) - len(differing)} identical "
              f"top-{K} lists; HR@10/NDCG@10 offline {off['hr@10']:.4f}/{off['ndcg@10']:.4f}, "
              f"served over gRPC {on['hr@10']:.4f}/{on['ndcg@10']:.4f}")
    assert not differing, f"{len(differing)} lists differ, e.g. {differing[:3]}"
    assert not other_scores, f"{len(other_scores)} lists' scores differ, e.g. {other_scores[:3]}"
    assert on["ndcg@10"] == off["ndcg@10"]


def test_a_held_out_user_gets_real_recommendations_with_explanations(served):
    client, data, cases, _ = served
    case = next(c for c in cases["warm"] if c.platform == "office")
    recs = client.ranking.recommend(case.case_id, "office", k=5)
    assert len(recs) == 5 and all(r.title and r.explanation for r in recs)
    assert recs.source == "personalised"
    session = [dict(e, user_id="", event_id="") for e in case.events[-50:]]
    anonymous = client.ranking.recommend("", "office", k=5, session_events=session)
    assert len(anonymous) == 5 and all(r.title for r in anonymous)
