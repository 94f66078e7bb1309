"""A dependency down (SIGKILL) or hung (SIGSTOP): embedding for fusion and ranking, fusion for
ranking, Redis for fusion (and for ranking through fusion). Callers get UNAVAILABLE or
DEADLINE_EXCEEDED within their deadline, naming the dependency, never a hang; once the
dependency is back on its port, calls succeed again and nothing acknowledged before was lost.
The stack here is this module's own."""

from __future__ import annotations

import time
from contextlib import contextmanager

import grpc
import pytest

from tools.redis_server import RedisServer
from tools.stack import ServiceProcess, start_stack
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from tests.reliability.support import frozen, pb_event, pb_item, rpc_outcome

DEADLINE_S = 3.0
# Time a call may take past its deadline: the client's own timer and thread wake-ups.
SLACK_S = 0.5
RECOVERY_LIMIT_S = 30.0
# An answer that names the hung dependency must beat the caller's own timer, so it comes
# with a margin (ranking keeps 20 % of the budget for this).
NAMED_BY_S = 0.9 * DEADLINE_S
NOW_MS = int(time.time() * 1000)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
OK = grpc.StatusCode.OK


@pytest.fixture(scope="module")
def deps(model_repo, tmp_path_factory, catalogue_items, amazon_users):
    """This module's own embedding, fusion (SQLite), ranking, and a fusion on Redis; tests
    that restart a process put the new one in this dict."""
    run_dir = tmp_path_factory.mktemp("deps")
    procs: dict = start_stack(run_dir, str(model_repo))
    redis = RedisServer(run_dir / "redis").start()
    procs["redis"] = redis
    try:
        procs["fusion_redis"] = ServiceProcess("fusion", [
            "--model-repo", str(model_repo), "--store", "redis", "--redis-url", redis.url,
            "--embedding-address", procs["embedding"].address],
            run_dir / "fusion-redis").start().wait_ready()
        with grpc.insecure_channel(procs["ranking"].address) as channel:
            ranking_pb2_grpc.RankingServiceStub(channel).UpsertItems(
                ranking_pb2.UpsertItemsRequest(items=[pb_item(r) for r in catalogue_items]),
                timeout=120)
        user, events = next(iter(amazon_users.items()))
        for name in ("fusion", "fusion_redis"):
            with grpc.insecure_channel(procs[name].address) as channel:
                fusion_pb2_grpc.FusionServiceStub(channel).Ingest(
                    fusion_pb2.IngestRequest(events=[pb_event(e) for e in events]), timeout=60)
        procs["user"] = user
        yield procs
    finally:
        codes = {name: procs[name].stop() for name in
                 ("ranking", "fusion_redis", "fusion", "embedding") if name in procs}
        redis.stop()
    assert set(codes.values()) == {0}, f"unclean exits: {codes}"


def restarted_on_its_port(proc: ServiceProcess) -> ServiceProcess:
    """The same server again, bound to the port it had (a fixed `--port` overrides 0)."""
    return ServiceProcess(proc.name, proc.args + ["--port", str(proc.port)], proc.run_dir,
                          proc.env).start().wait_ready()


def until_ok(call) -> tuple[object, float]:
    """Retry `call` (100 ms apart, bounded) until it succeeds: (reply, seconds it took)."""
    started = time.monotonic()
    while True:
        code, details, _, reply = rpc_outcome(call)
        if code == OK:
            return reply, time.monotonic() - started
        if time.monotonic() - started > RECOVERY_LIMIT_S:
            raise AssertionError(f"no recovery after {RECOVERY_LIMIT_S:.0f} s: "
                                 f"{code.name}: {details}")
        time.sleep(0.1)


@contextmanager
def fusion_stub(procs, name="fusion"):
    with grpc.insecure_channel(procs[name].address) as channel:
        yield fusion_pb2_grpc.FusionServiceStub(channel)


@contextmanager
def ranking_stub(procs):
    with grpc.insecure_channel(procs["ranking"].address) as channel:
        yield ranking_pb2_grpc.RankingServiceStub(channel)


def new_item_event(tag: str) -> fusion_pb2.IngestRequest:
    """One event on an item never seen before: storing it needs the embedding service."""
    return fusion_pb2.IngestRequest(events=[pb_event(dict(
        event_id=f"dep-{tag}", user_id=f"dep-user-{tag}", platform="office", action=5,
        item_id=f"dep-item-{tag}", item_text=f"{tag} ergonomic mesh office chair",
        event_time_ms=NOW_MS))])


def report(what: str, code: grpc.StatusCode, details: str, seconds: float) -> None:
    print(f"\n{what}: {code.name} in {seconds:.3f} s (deadline {DEADLINE_S:.0f} s): {details}")


def test_fusion_and_ranking_answer_unavailable_naming_embedding_while_it_is_down(deps):
    with fusion_stub(deps) as fusion, ranking_stub(deps) as ranking:
        embedding = deps["embedding"]
        named = f"embedding service at {embedding.address}"
        embedding.kill()
        try:
            code, details, seconds, _ = rpc_outcome(fusion.Ingest, new_item_event("down"),
                                                    timeout=DEADLINE_S)
            report("fusion Ingest, embedding killed", code, details, seconds)
            assert code == UNAVAILABLE and named in details and seconds < DEADLINE_S
            item = ranking_pb2.Item(item_id="dep-new", platform="office", title="walnut desk tray")
            code, details, seconds, _ = rpc_outcome(ranking.UpsertItems,
                                                    ranking_pb2.UpsertItemsRequest(items=[item]),
                                                    timeout=DEADLINE_S)
            report("ranking UpsertItems, embedding killed", code, details, seconds)
            assert code == UNAVAILABLE and named in details and seconds < DEADLINE_S
            profile = fusion.GetProfile(fusion_pb2.GetProfileRequest(user_id=deps["user"]),
                                        timeout=DEADLINE_S)
            assert profile.known, "reading a stored profile does not need the embedding service"
        finally:
            deps["embedding"] = restarted_on_its_port(embedding)
        _, recovered_s = until_ok(lambda: fusion.Ingest(new_item_event("down"), timeout=DEADLINE_S))
        reply, _ = until_ok(lambda: ranking.UpsertItems(
            ranking_pb2.UpsertItemsRequest(items=[item]), timeout=DEADLINE_S))
        print(f"fusion recovered {recovered_s:.2f} s after the embedding restart")
        assert reply.upserted == 1


def test_fusion_answers_within_its_deadline_while_embedding_is_frozen(deps):
    with fusion_stub(deps) as fusion:
        with frozen(deps["embedding"].proc.pid):
            code, details, seconds, _ = rpc_outcome(fusion.Ingest, new_item_event("frozen"),
                                                    timeout=DEADLINE_S)
        report("fusion Ingest, embedding frozen", code, details, seconds)
        assert code == DEADLINE_EXCEEDED and seconds < DEADLINE_S + SLACK_S
        reply, recovered_s = until_ok(lambda: fusion.Ingest(new_item_event("frozen"),
                                                            timeout=DEADLINE_S))
        print(f"fusion recovered {recovered_s:.2f} s after the thaw")
        assert reply.accepted + reply.duplicates == 1


def test_fusion_names_a_frozen_embedding_service_before_the_callers_deadline(deps):
    with fusion_stub(deps) as fusion, frozen(deps["embedding"].proc.pid):
        code, details, seconds, _ = rpc_outcome(fusion.Ingest, new_item_event("frozen-named"),
                                                timeout=DEADLINE_S)
    assert code == DEADLINE_EXCEEDED and seconds < NAMED_BY_S
    assert f"embedding service at {deps['embedding'].address}" in details, details


def test_ranking_answers_unavailable_naming_fusion_while_it_is_down(deps):
    with ranking_stub(deps) as ranking:
        fusion = deps["fusion"]
        request = ranking_pb2.RecommendRequest(user_id=deps["user"], platform="office", k=5)
        fusion.kill()
        try:
            code, details, seconds, _ = rpc_outcome(ranking.Recommend, request, timeout=DEADLINE_S)
            report("ranking Recommend, fusion killed", code, details, seconds)
            assert code == UNAVAILABLE and f"fusion service at {fusion.address}" in details
            assert seconds < DEADLINE_S
        finally:
            deps["fusion"] = restarted_on_its_port(fusion)
        reply, recovered_s = until_ok(lambda: ranking.Recommend(request, timeout=DEADLINE_S))
        print(f"ranking recovered {recovered_s:.2f} s after the fusion restart")
        assert reply.source == ranking_pb2.SOURCE_PERSONALISED and len(reply.items) == 5


def test_ranking_answers_deadline_exceeded_naming_fusion_while_it_is_frozen(deps):
    with ranking_stub(deps) as ranking:
        request = ranking_pb2.RecommendRequest(user_id=deps["user"], platform="office", k=5)
        # This channel's ranking worker process reaches fusion first: each worker has its own
        # connection to it, which may still be reconnecting after the restart above.
        until_ok(lambda: ranking.Recommend(request, timeout=DEADLINE_S))
        with frozen(deps["fusion"].proc.pid):
            code, details, seconds, _ = rpc_outcome(ranking.Recommend, request, timeout=DEADLINE_S)
        report("ranking Recommend, fusion frozen", code, details, seconds)
        assert code == DEADLINE_EXCEEDED and seconds < DEADLINE_S + SLACK_S
        assert f"fusion service at {deps['fusion'].address}" in details
        reply, recovered_s = until_ok(lambda: ranking.Recommend(request, timeout=DEADLINE_S))
        print(f"ranking recovered {recovered_s:.2f} s after the thaw")
        assert len(reply.items) == 5


def test_fusion_answers_unavailable_naming_redis_while_it_is_down_and_loses_nothing(deps):
    with fusion_stub(deps, "fusion_redis") as fusion:
        redis: RedisServer = deps["redis"]
        acked = new_item_event("redis-acked")
        assert fusion.Ingest(acked, timeout=DEADLINE_S).accepted == 1
        named = f"redis at 127.0.0.1:{redis.port}"
        redis.kill()
        try:
            for what, call, request in (
                    ("Ingest", fusion.Ingest, new_item_event("redis-down")),
                    ("GetProfile", fusion.GetProfile,
                     fusion_pb2.GetProfileRequest(user_id=deps["user"]))):
                code, details, seconds, _ = rpc_outcome(call, request, timeout=DEADLINE_S)
                report(f"fusion {what}, Redis killed", code, details, seconds)
                assert code == UNAVAILABLE and named in details and seconds < DEADLINE_S
        finally:
            redis.start()
        assert named == f"redis at 127.0.0.1:{redis.port}", "Redis came back on its own port"
        reply, recovered_s = until_ok(lambda: fusion.Ingest(acked, timeout=DEADLINE_S))
        print(f"fusion on Redis recovered {recovered_s:.2f} s after the Redis restart")
        assert reply.duplicates == 1, "the event acknowledged before the crash was lost"


def test_fusion_answers_within_its_deadline_while_redis_is_frozen(deps):
    with fusion_stub(deps, "fusion_redis") as fusion:
        with frozen(deps["redis"].proc.pid):
            code, details, seconds, _ = rpc_outcome(
                fusion.GetProfile, fusion_pb2.GetProfileRequest(user_id=deps["user"]),
                timeout=DEADLINE_S)
        report("fusion GetProfile, Redis frozen", code, details, seconds)
        assert code == DEADLINE_EXCEEDED and seconds < DEADLINE_S + SLACK_S
        reply, recovered_s = until_ok(lambda: fusion.GetProfile(
            fusion_pb2.GetProfileRequest(user_id=deps["user"]), timeout=DEADLINE_S))
        print(f"fusion on Redis recovered {recovered_s:.2f} s after the thaw")
        assert reply.known


def test_fusion_names_a_frozen_redis_before_the_callers_deadline(deps):
    with fusion_stub(deps, "fusion_redis") as fusion, frozen(deps["redis"].proc.pid):
        code, details, seconds, _ = rpc_outcome(
            fusion.GetProfile, fusion_pb2.GetProfileRequest(user_id=deps["user"]),
            timeout=DEADLINE_S)
    report("fusion GetProfile, Redis frozen", code, details, seconds)
    assert code in (DEADLINE_EXCEEDED, UNAVAILABLE) and seconds < NAMED_BY_S
    assert f"redis at 127.0.0.1:{deps['redis'].port}" in details, details


def test_fusion_ingest_names_a_frozen_redis_in_time_and_a_resend_is_not_stored_twice(deps):
    request = new_item_event("redis-frozen-ingest")
    with fusion_stub(deps, "fusion_redis") as fusion:
        with frozen(deps["redis"].proc.pid):
            code, details, seconds, _ = rpc_outcome(fusion.Ingest, request, timeout=DEADLINE_S)
        report("fusion Ingest, Redis frozen", code, details, seconds)
        assert code in (DEADLINE_EXCEEDED, UNAVAILABLE) and seconds < NAMED_BY_S
        assert f"redis at 127.0.0.1:{deps['redis'].port}" in details, details
        reply, _ = until_ok(lambda: fusion.Ingest(request, timeout=DEADLINE_S))
        assert reply.accepted + reply.duplicates == 1
        assert fusion.Ingest(request, timeout=DEADLINE_S).duplicates == 1
        profile = fusion.GetProfile(fusion_pb2.GetProfileRequest(
            user_id="dep-user-redis-frozen-ingest"), timeout=DEADLINE_S)
        assert profile.total_events == 1


def test_ranking_names_redis_behind_fusion_before_the_callers_deadline(
        deps, model_repo, catalogue_items, tmp_path):
    """A ranking of its own on the fusion that uses Redis; Recommend reads the profile there."""
    ranking = ServiceProcess("ranking", [
        "--model-repo", str(model_repo),
        "--embedding-address", deps["embedding"].address,
        "--fusion-address", deps["fusion_redis"].address,
        "--catalog-path", str(tmp_path / "catalog.sqlite3")], tmp_path).start()
    try:
        ranking.wait_ready()
        office = [pb_item(r) for r in catalogue_items if r["platform"] == "office"]
        request = ranking_pb2.RecommendRequest(user_id=deps["user"], platform="office", k=5)
        with grpc.insecure_channel(ranking.address) as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            stub.UpsertItems(ranking_pb2.UpsertItemsRequest(items=office), timeout=60)
            assert len(stub.Recommend(request, timeout=DEADLINE_S).items) == 5
            with frozen(deps["redis"].proc.pid):
                code, details, seconds, _ = rpc_outcome(stub.Recommend, request,
                                                        timeout=DEADLINE_S)
            report("ranking Recommend, Redis behind fusion frozen", code, details, seconds)
            assert code in (DEADLINE_EXCEEDED, UNAVAILABLE) and seconds < NAMED_BY_S
            assert f"fusion service at {deps['fusion_redis'].address}" in details, details
            assert f"redis at 127.0.0.1:{deps['redis'].port}" in details, details
            reply, _ = until_ok(lambda: stub.Recommend(request, timeout=DEADLINE_S))
            assert len(reply.items) == 5
    finally:
        assert ranking.stop() == 0


# --- reconnecting: a restarted dependency is found within seconds ---------------------------
# Long enough for gRPC's default reconnect backoff (1 s x 1.6 per attempt, up to 120 s) to
# have grown past 10 s: calls then kept failing for 15-22 s after the dependency was back.
DOWN_S = 30.0
RECONNECTED_WITHIN_S = 2.0
PROBE_EVERY_S = 0.25


def first_ok_after(call, since: float) -> float:
    """Seconds from `since` to the first call that succeeds (probing every 50 ms)."""
    while True:
        code, details, _, _ = rpc_outcome(call)
        if code == OK:
            return time.monotonic() - since
        if time.monotonic() - since > RECOVERY_LIMIT_S:
            raise AssertionError(f"no success {RECOVERY_LIMIT_S:.0f} s after the dependency "
                                 f"was SERVING: {code.name}: {details}")
        time.sleep(0.05)


@pytest.mark.parametrize("dependency", ["fusion", "embedding"])
def test_calls_succeed_within_two_seconds_of_a_restarted_dependency_serving(deps, dependency):
    if dependency == "fusion":
        caller = grpc.insecure_channel(deps["ranking"].address)
        request = ranking_pb2.RecommendRequest(user_id=deps["user"], platform="office", k=5)
        stub = ranking_pb2_grpc.RankingServiceStub(caller)

        def call():
            return stub.Recommend(request, timeout=DEADLINE_S)
    else:
        caller = grpc.insecure_channel(deps["fusion"].address)
        stub = fusion_pb2_grpc.FusionServiceStub(caller)
        tags = iter(range(10**6))

        def call():  # an item never seen before: storing it needs the embedding service
            return stub.Ingest(new_item_event(f"reconnect-{next(tags)}"), timeout=DEADLINE_S)
    try:
        until_ok(call)
        victim = deps[dependency]
        victim.kill()
        down_until = time.monotonic() + DOWN_S
        codes = set()
        while time.monotonic() < down_until:  # the caller's channel keeps trying
            codes.add(rpc_outcome(call)[0])
            time.sleep(PROBE_EVERY_S)
        deps[dependency] = restarted_on_its_port(victim)
        serving_at = time.monotonic()
        seconds = first_ok_after(call, serving_at)
        print(f"\n{dependency} down {DOWN_S:.0f} s ({sorted(c.name for c in codes)}): first "
              f"success {seconds:.2f} s after it was SERVING again")
        assert codes == {UNAVAILABLE}
        assert seconds <= RECONNECTED_WITHIN_S
    finally:
        caller.close()
