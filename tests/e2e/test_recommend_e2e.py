"""End to end on the real model and the real data: the three services as processes, the whole
Amazon Arts/Office catalogue, real training users' events ingested over gRPC, and held-out users
ranked through Recommend. The same cases ranked by the offline evaluation's in-process pipeline
(export/evaluate.py), given the same item popularity, must give the same lists: the offline
figures are the served system's."""

import time
from dataclasses import replace

import numpy as np
import pytest

from clients.crossrec_client import CrossrecClient, Item
from clients.datasets import AMAZON, iter_events, item_texts, read_items, to_event
from clients.stack import start_stack
from export.evaluate import build_cases, default_data, evaluate_system, rank_fn, validation_users

SAMPLE_USERS = 40      # held-out users ranked both ways (more: -m slow variant below)
INGESTED_USERS = 1500  # training users whose events give the served popularity


@pytest.fixture(scope="module")
def served(model_repo, tmp_path_factory):
    """The stack with the full catalogue and every training user's events."""
    data = default_data(str(model_repo))
    procs = start_stack(tmp_path_factory.mktemp("e2e"), str(model_repo),
                        extra={"ranking": ["--popularity-refresh-s", "2"]})
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
        assert client.fusion.ingest_stream(events).accepted == len(events)
        counts = np.zeros(len(data.ids))
        for e in events:
            counts[data.row_of[(e["platform"], e["item_id"])]] += 1
        time.sleep(3)  # let ranking re-read popularity
        yield client, replace(data, counts=counts)  # the offline side sees the same popularity
    finally:
        client.close()
        codes = {n: p.stop() for n, p in reversed(list(procs.items()))}
        assert set(codes.values()) == {0}, codes


def grpc_rank(client):
    def rank(events, platform):
        session = [dict(e, user_id="", event_id="") for e in events[-100:]]
        recs = client.ranking.recommend("", platform, k=100, session_events=session)
        return [r.item_id for r in recs]
    return rank


def memo(rank, cases):
    """The ranked lists of `cases`, computed once, as a rank function evaluate_system takes."""
    lists = {id(c.events): list(rank(c.events, c.platform)) for c in cases}
    return lambda events, platform: lists[id(events)]


def compare(served, model_repo, setting, n_users):
    client, data = served
    cases = build_cases("A", setting, validation_users(data)[:n_users], data)
    offline = memo(rank_fn("crossrec", str(model_repo), data), cases)
    online = memo(grpc_rank(client), cases)
    same_top10 = np.mean([offline(c.events, c.platform)[:10] == online(c.events, c.platform)[:10]
                          for c in cases])
    off = evaluate_system(offline, cases, data)["pooled"]
    on = evaluate_system(online, cases, data)["pooled"]
    print(f"\n[e2e {setting}] {len(cases)} cases: identical top-10 lists {same_top10:.1%}; "
          f"HR@10/NDCG@10 offline {off['hr@10']:.4f}/{off['ndcg@10']:.4f}, "
          f"served over gRPC {on['hr@10']:.4f}/{on['ndcg@10']:.4f}")
    assert same_top10 >= 0.9
    assert abs(on["ndcg@10"] - off["ndcg@10"]) <= 0.01


@pytest.mark.parametrize("setting", ["warm", "cold"])
def test_served_recommend_matches_the_offline_evaluation(served, model_repo, setting, capsys):
    with capsys.disabled():
        compare(served, model_repo, setting, SAMPLE_USERS)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["warm", "cold"])
def test_served_recommend_matches_the_offline_evaluation_on_300_users(served, model_repo,
                                                                      setting, capsys):
    with capsys.disabled():
        compare(served, model_repo, setting, 300)


def test_a_held_out_user_gets_real_recommendations_with_explanations(served):
    client, data = served
    user = validation_users(data)[0]
    events = [e for c in build_cases("A", "warm", [user], data) for e in c.events][:50]
    recs = client.ranking.recommend("", "office", k=5, session_events=[
        dict(e, user_id="", event_id="") for e in events])
    assert len(recs) == 5 and all(r.title and r.explanation for r in recs)
    assert recs.source == "personalised"
