"""Two ranking replicas on one shared Redis catalogue (--catalog-store redis), one embedding
and one fusion: what one replica writes, the other serves within a bounded wait, and a
restarted replica loads the catalogue back from Redis."""

from __future__ import annotations

import time

import grpc
import pytest

from tools.redis_server import RedisServer
from tools.stack import ServiceProcess, start_stack
from crossrec.common.v1 import common_pb2
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc

PLATFORM = "replica_test"
# How long a replica may take to show the other's write before the test gives up: far above
# what it takes (milliseconds), far below a hang.
VISIBLE_WITHIN_S = 10.0
SESSION = [common_pb2.BehaviorEvent(platform="office", action=2, item_id="replica-seed",
                                    item_text="ergonomic mesh office chair with lumbar support",
                                    event_time_ms=int(time.time() * 1000))]


@pytest.fixture(scope="module")
def replicas(model_repo, tmp_path_factory):
    """embedding, fusion, a Redis, and ranking replicas `a` and `b` on its catalogue."""
    run_dir = tmp_path_factory.mktemp("replicas")
    procs: dict = start_stack(run_dir, str(model_repo), names=("embedding", "fusion"))
    redis = RedisServer(run_dir / "redis").start()
    args = ["--model-repo", str(model_repo), "--embedding-address", procs["embedding"].address,
            "--fusion-address", procs["fusion"].address, "--catalog-store", "redis",
            "--catalog-redis-url", redis.url]
    try:
        for name in ("a", "b"):
            procs[name] = ServiceProcess("ranking", args, run_dir / name).start()
        for name in ("a", "b"):
            procs[name].wait_ready()
        yield procs
    finally:
        codes = {name: procs[name].stop() for name in ("b", "a", "fusion", "embedding")
                 if name in procs}
        redis.stop()
    assert set(codes.values()) == {0}, f"unclean exits: {codes}"


def stub(proc: ServiceProcess):
    channel = grpc.insecure_channel(proc.address)
    return channel, ranking_pb2_grpc.RankingServiceStub(channel)


def recommended(ranking) -> list[str] | None:
    """Item ids Recommend answers on PLATFORM for an anonymous session (retrieval through the
    replica's index); None while the replica has no item there."""
    try:
        reply = ranking.Recommend(ranking_pb2.RecommendRequest(
            platform=PLATFORM, k=10, session_events=SESSION), timeout=10)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no catalogue" in err.details():
            return None
        raise
    return [i.item_id for i in reply.items]


def wait_until(check, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > VISIBLE_WITHIN_S:
            raise AssertionError(f"{what} not within {VISIBLE_WITHIN_S:.0f} s")
    return time.monotonic() - started


def items(*ids: str) -> ranking_pb2.UpsertItemsRequest:
    titles = {"desk": "standing desk converter", "lamp": "led desk lamp with usb port",
              "chair": "ergonomic mesh office chair", "mat": "anti fatigue standing mat"}
    return ranking_pb2.UpsertItemsRequest(items=[
        ranking_pb2.Item(item_id=i, platform=PLATFORM, title=titles[i]) for i in ids])


def test_replicas_share_upserts_deletes_and_reload_the_catalogue_after_a_restart(replicas):
    channel_a, a = stub(replicas["a"])
    channel_b, b = stub(replicas["b"])
    try:
        assert recommended(b) is None
        assert a.UpsertItems(items("desk", "lamp", "chair"), timeout=30).upserted == 3
        assert sorted(recommended(a)) == ["chair", "desk", "lamp"], "A serves it on return"
        seen_s = wait_until(lambda: sorted(recommended(b) or []) == ["chair", "desk", "lamp"],
                            "A's upsert on B")
        print(f"\nupsert through A recommended through B {seen_s * 1000:.0f} ms after A's "
              "acknowledgement (one poll is a whole Recommend)")
        assert recommended(b)[0] == "chair", "B retrieves by its own index: the nearest first"

        assert b.DeleteItems(ranking_pb2.DeleteItemsRequest(
            platform=PLATFORM, item_ids=["lamp"]), timeout=30).deleted == 1
        assert "lamp" not in recommended(b)
        gone_s = wait_until(lambda: "lamp" not in recommended(a), "B's delete on A")
        print(f"delete through B gone from A {gone_s * 1000:.0f} ms after B's acknowledgement")

        channel_a.close()
        assert replicas["a"].stop() == 0
        assert b.UpsertItems(items("mat"), timeout=30).upserted == 1  # while A is down
        replicas["a"] = ServiceProcess("ranking", replicas["a"].args, replicas["a"].run_dir)
        replicas["a"].start().wait_ready()
        channel_a, a = stub(replicas["a"])
        assert sorted(recommended(a)) == ["chair", "desk", "mat"], "reloaded from Redis"
    finally:
        channel_a.close()
        channel_b.close()
