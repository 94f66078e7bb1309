"""All three services as processes on loopback: Recommend for warm, cold-platform, unknown
and anonymous users, new items by text alone, exclude_seen, bad input, fusion down."""

import time

import grpc
import pytest

from tools.stack import ServiceProcess, start_stack
from crossrec.common.v1 import common_pb2
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from dataio import AMAZON, read_items

NOW_MS = int(time.time() * 1000)
PERSONALISED = ranking_pb2.SOURCE_PERSONALISED
CROSS = ranking_pb2.SOURCE_CROSS_PLATFORM
POPULAR = ranking_pb2.SOURCE_POPULARITY_FALLBACK


def pb_event(e: dict) -> common_pb2.BehaviorEvent:
    return common_pb2.BehaviorEvent(**{k: v for k, v in e.items() if v is not None})


def pb_item(r: dict) -> ranking_pb2.Item:
    return ranking_pb2.Item(item_id=r["item_id"], platform=r["platform"], title=r["title"],
                            attributes=r["attributes"])


@pytest.fixture(scope="module")
def stack(model_repo, tmp_path_factory, amazon_users):
    procs = start_stack(tmp_path_factory.mktemp("stack"), str(model_repo),
                        extra={"ranking": ["--popularity-refresh-s", "1"]})
    # The catalogue: every item the test users touched plus a fixed slice of the rest.
    touched = {(e["platform"], e["item_id"]) for es in amazon_users.values() for e in es}
    items = [r for n, r in enumerate(read_items(AMAZON))
             if (r["platform"], r["item_id"]) in touched or n % 40 == 0]
    with grpc.insecure_channel(procs["ranking"].address) as channel:
        ranking = ranking_pb2_grpc.RankingServiceStub(channel)
        for start in range(0, len(items), 500):
            ranking.UpsertItems(ranking_pb2.UpsertItemsRequest(
                items=[pb_item(r) for r in items[start:start + 500]]), timeout=120)
    with grpc.insecure_channel(procs["fusion"].address) as channel:
        fusion = fusion_pb2_grpc.FusionServiceStub(channel)
        for user, events in list(amazon_users.items())[:15]:
            fusion.Ingest(fusion_pb2.IngestRequest(events=[pb_event(e) for e in events]),
                          timeout=60)
    time.sleep(1.5)  # one popularity refresh
    yield procs
    codes = {name: p.stop() for name, p in reversed(list(procs.items()))}
    assert set(codes.values()) == {0}, codes


@pytest.fixture(scope="module")
def ranking(stack):
    with grpc.insecure_channel(stack["ranking"].address) as channel:
        yield ranking_pb2_grpc.RankingServiceStub(channel)


@pytest.fixture(scope="module")
def fusion(stack):
    with grpc.insecure_channel(stack["fusion"].address) as channel:
        yield fusion_pb2_grpc.FusionServiceStub(channel)


def recommend(stub, user="", platform="office", k=10, **kw):
    return stub.Recommend(ranking_pb2.RecommendRequest(user_id=user, platform=platform, k=k,
                                                       **kw), timeout=10)


def test_warm_user_gets_personalised_items_with_explanations(ranking, amazon_users):
    user = next(iter(amazon_users))
    reply = recommend(ranking, user, "office")
    assert len(reply.items) == 10 and reply.source == PERSONALISED
    assert all(i.platform == "office" and i.title and i.explanation for i in reply.items)
    assert all(len(i.contributions) >= 1 for i in reply.items)
    scores = [i.score for i in reply.items]
    assert scores == sorted(scores, reverse=True)
    assert set(reply.platform_weights) == {"arts_crafts", "office"}
    assert {m.name for m in reply.models} >= {"encoder"}


def test_cold_platform_user_is_served_from_other_platforms(ranking, fusion, amazon_users):
    arts_only = [dict(e, user_id="cold-user") for e in list(amazon_users.values())[1]
                 if e["platform"] == "arts_crafts"]
    fusion.Ingest(fusion_pb2.IngestRequest(events=[pb_event(e) for e in arts_only]), timeout=30)
    reply = recommend(ranking, "cold-user", "office")
    assert reply.source == CROSS and len(reply.items) == 10
    assert all(c.platform == "arts_crafts" for i in reply.items for c in i.contributions)
    assert "arts_crafts" in reply.items[0].explanation


def test_unknown_user_gets_flagged_popularity_fallback(ranking):
    reply = recommend(ranking, "never-seen-anywhere", "arts_crafts")
    assert reply.source == POPULAR and len(reply.items) == 10
    assert all(i.source == POPULAR and "popular on arts_crafts" in i.explanation
               for i in reply.items)
    assert not reply.degraded


def test_anonymous_session_events_personalise_without_storing(ranking, fusion):
    session = [pb_event(dict(event_id="", user_id="", platform="arts_crafts", action=2,
                             item_id="anon-1", item_text="watercolor paint brushes set",
                             event_time_ms=NOW_MS))]
    reply = ranking.Recommend(ranking_pb2.RecommendRequest(
        platform="arts_crafts", k=5, session_events=session), timeout=10)
    assert reply.source == PERSONALISED and len(reply.items) == 5


def test_a_new_item_is_recommended_by_its_text_alone(ranking, fusion):
    ranking.UpsertItems(ranking_pb2.UpsertItemsRequest(items=[ranking_pb2.Item(
        item_id="brand-new-1", platform="office",
        title="zorblax fluorescent neon highlighter markers chisel tip 24 pack",
        attributes={"category": "office products writing highlighters"})]), timeout=30)
    fans = [dict(event_id=f"hl-{n}", user_id="highlighter-fan", platform="office", action=5,
                 item_id=f"hl-{n}", item_text=t, event_time_ms=NOW_MS - n)
            for n, t in enumerate(["neon highlighter markers chisel tip",
                                   "fluorescent highlighters assorted colors 12 pack"])]
    fusion.Ingest(fusion_pb2.IngestRequest(events=[pb_event(e) for e in fans]), timeout=30)
    reply = recommend(ranking, "highlighter-fan", "office", k=10)
    assert "brand-new-1" in [i.item_id for i in reply.items]


def test_exclude_seen_leaves_out_the_users_items(ranking, amazon_users):
    user, events = next(iter(amazon_users.items()))
    seen = {e["item_id"] for e in events if e["platform"] == "office"}
    plain = {i.item_id for i in recommend(ranking, user, "office", k=50).items}
    excluded = {i.item_id for i in recommend(ranking, user, "office", k=50,
                                             exclude_seen=True).items}
    assert not excluded & seen
    assert plain & seen, "the test needs a user whose seen items rank at all"


def test_diversified_list_is_a_reordering_of_candidates(ranking, amazon_users):
    user = next(iter(amazon_users))
    reply = recommend(ranking, user, "office", k=10, diversify=True, diversity_lambda=0.5)
    assert len({i.item_id for i in reply.items}) == 10


@pytest.mark.parametrize("kw, fragment", [
    (dict(user="u", k=0), "k must be in 1..1000, got 0"),
    (dict(user="u", k=1001), "k must be in 1..1000, got 1001"),
    (dict(user="u", k=-3), "k must be in 1..1000, got -3"),
    (dict(user="u", platform="video"), "platform 'video' has no catalogue"),
    (dict(user="u", platform="Bad Platform"), "platform must match"),
    (dict(user=""), "user_id is required unless session_events are given"),
])
def test_bad_recommend_input_is_invalid_argument(ranking, kw, fragment):
    with pytest.raises(grpc.RpcError) as err:
        recommend(ranking, **kw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()


@pytest.mark.parametrize("fallback", [False, True])
def test_fusion_down_is_unavailable_or_the_flagged_fallback(fallback, stack, model_repo, tmp_path):
    args = ["--model-repo", str(model_repo), "--embedding-address", stack["embedding"].address,
            "--fusion-address", "127.0.0.1:9", "--catalog-path", str(tmp_path / "c.sqlite3")]
    proc = ServiceProcess("ranking", args + (["--fusion-fallback"] if fallback else []),
                          tmp_path).start().wait_ready(60)
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            stub.UpsertItems(ranking_pb2.UpsertItemsRequest(items=[ranking_pb2.Item(
                item_id="x", platform="office", title="stapler")]), timeout=30)
            if fallback:
                reply = recommend(stub, "u", "office", k=1)
                assert reply.degraded and "fusion" in reply.degraded_reason
                assert reply.source == POPULAR
            else:
                with pytest.raises(grpc.RpcError) as err:
                    recommend(stub, "u", "office", k=1)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "fusion service at 127.0.0.1:9" in err.value.details()
    finally:
        assert proc.stop() == 0


def test_upserted_items_survive_a_ranking_restart(stack, model_repo, tmp_path):
    args = ["--model-repo", str(model_repo), "--embedding-address", stack["embedding"].address,
            "--fusion-address", stack["fusion"].address,
            "--catalog-path", str(tmp_path / "c.sqlite3")]
    for round_ in range(2):
        proc = ServiceProcess("ranking", args, tmp_path / str(round_)).start().wait_ready(60)
        with grpc.insecure_channel(proc.address) as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            if round_ == 0:
                stub.UpsertItems(ranking_pb2.UpsertItemsRequest(items=[ranking_pb2.Item(
                    item_id="keep-me", platform="office", title="archival box")]), timeout=30)
                proc.kill()
            else:
                reply = recommend(stub, "someone-new", "office", k=5)
                assert [i.item_id for i in reply.items] == ["keep-me"]
                assert proc.stop() == 0
