"""Embedding + fusion as real processes on loopback: ingest real events, read profiles,
bad input, and crash durability (SIGKILL during ingest loses no acknowledged event)."""

import random
import threading
import time

import grpc
import pytest

from tools.stack import ServiceProcess, start_stack
from crossrec.common.v1 import common_pb2
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc

NOW_MS = int(time.time() * 1000)


def pb_event(e: dict) -> common_pb2.BehaviorEvent:
    fields = {k: v for k, v in e.items() if v is not None}
    return common_pb2.BehaviorEvent(**fields)


@pytest.fixture(scope="module")
def stack(model_repo, tmp_path_factory):
    procs = start_stack(tmp_path_factory.mktemp("stack"), str(model_repo),
                        names=("embedding", "fusion"))
    yield procs
    codes = {name: p.stop() for name, p in reversed(list(procs.items()))}
    assert codes == {"fusion": 0, "embedding": 0}


@pytest.fixture(scope="module")
def fusion(stack):
    with grpc.insecure_channel(stack["fusion"].address) as channel:
        yield fusion_pb2_grpc.FusionServiceStub(channel)


def ingest(stub, events, timeout=30):
    return stub.Ingest(fusion_pb2.IngestRequest(events=[pb_event(e) for e in events]),
                       timeout=timeout)


def test_ingested_real_events_come_back_in_profiles(fusion, amazon_users):
    users = list(amazon_users.items())[:10]
    for user, events in users:
        reply = ingest(fusion, events)
        assert reply.accepted + reply.duplicates == len(events)
    for user, events in users:
        profile = fusion.GetProfile(fusion_pb2.GetProfileRequest(
            user_id=user, for_platform="office", recent_events_limit=5), timeout=10)
        assert profile.known and profile.total_events == len(events)
        assert {p.platform for p in profile.platforms} == {e["platform"] for e in events}
        assert len(profile.fused_vector) == len(profile.for_platform_vector) == profile.dim == 384
        assert len(profile.recent_events) == 5 and len(profile.recent_events[0].item_vector) == 384
        assert profile.recent_events[0].event.event_time_ms == max(e["event_time_ms"]
                                                                   for e in events)
        # What ranking asks: the same answer, only without the recent items' vectors.
        lean = fusion.GetProfile(fusion_pb2.GetProfileRequest(
            user_id=user, for_platform="office", recent_events_limit=5,
            omit_item_vectors=True), timeout=10)
        assert [r.event for r in lean.recent_events] == [r.event for r in profile.recent_events]
        assert all(len(r.item_vector) == 0 for r in lean.recent_events)
        assert lean.for_platform_vector == profile.for_platform_vector


def test_bulk_stream_ingest_counts_every_batch(fusion, amazon_users):
    users = list(amazon_users.items())[10:20]
    batches = [fusion_pb2.IngestRequest(events=[pb_event(e) for e in events])
               for _, events in users]
    reply = fusion.IngestStream(iter(batches), timeout=60)
    assert reply.batches == len(batches)
    assert reply.accepted + reply.duplicates == sum(len(e) for _, e in users)
    again = fusion.IngestStream(iter(batches), timeout=60)
    assert again.accepted == 0 and again.duplicates == reply.accepted + reply.duplicates


def test_read_your_writes_after_an_acknowledged_ingest(fusion):
    event = dict(event_id="ryw-1", user_id="ryw", platform="office", action=5, item_id="p1",
                 item_text="heavy duty stapler", event_time_ms=NOW_MS)
    assert ingest(fusion, [event]).accepted == 1
    profile = fusion.GetProfile(fusion_pb2.GetProfileRequest(user_id="ryw"), timeout=10)
    assert profile.total_events == 1 and profile.platforms[0].platform == "office"


def test_delete_user_removes_the_profile_and_is_idempotent(fusion):
    event = dict(event_id="del-1", user_id="gone", platform="office", action=2, item_id="p9",
                 item_text="desk lamp", event_time_ms=NOW_MS)
    ingest(fusion, [event])
    assert fusion.DeleteUser(fusion_pb2.DeleteUserRequest(user_id="gone"),
                             timeout=10).deleted_events == 1
    assert not fusion.GetProfile(fusion_pb2.GetProfileRequest(user_id="gone"), timeout=10).known
    assert fusion.DeleteUser(fusion_pb2.DeleteUserRequest(user_id="gone"),
                             timeout=10).deleted_events == 0


def _ok(**over):
    base = dict(event_id="", user_id="bad-input-user", platform="office", action=2,
                item_id="b1", item_text="paper clips", event_time_ms=NOW_MS)
    base.update(over)
    return base


@pytest.mark.parametrize("bad, fragment", [
    (_ok(user_id=""), "events[1].user_id is required"),
    (_ok(action=99), "events[1].action must be one of"),
    (_ok(platform="Office!"), "events[1].platform must match"),
    (_ok(event_time_ms=NOW_MS + 10 * 24 * 3600 * 1000), "events[1].event_time_ms must be at most"),
    (_ok(item_text="x" * 1_000_000), "events[1].item_text must be at most 65536"),
])
def test_bad_events_are_invalid_argument_and_nothing_is_written(fusion, bad, fragment):
    with pytest.raises(grpc.RpcError) as err:
        ingest(fusion, [_ok(event_id="first-good"), bad])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()
    assert not fusion.GetProfile(fusion_pb2.GetProfileRequest(user_id="bad-input-user"),
                                 timeout=10).known


def test_a_batch_over_the_limit_is_invalid_argument(fusion):
    with pytest.raises(grpc.RpcError) as err:
        ingest(fusion, [_ok(event_id=str(i)) for i in range(1001)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1000 events, got 1001" in err.value.details()


def test_fusion_refuses_to_start_without_a_user_model(tmp_path, stack):
    proc = ServiceProcess("fusion", ["--model-repo", str(tmp_path / "empty"),
                                     "--embedding-address", stack["embedding"].address],
                          tmp_path, env={"CROSSREC_ALLOW_BASELINE": "0"}).start()
    try:
        with pytest.raises(RuntimeError, match="--allow-baseline"):
            proc.wait_ready(60)
    finally:
        proc.stop()


def test_baseline_flag_serves_the_untrained_pooling_named_as_such(tmp_path, stack):
    proc = ServiceProcess("fusion", ["--model-repo", str(tmp_path / "empty"), "--allow-baseline",
                                     "--embedding-address", stack["embedding"].address,
                                     "--sqlite-path", str(tmp_path / "b.sqlite3")],
                          tmp_path).start().wait_ready(60)
    with grpc.insecure_channel(proc.address) as channel:
        stub = fusion_pb2_grpc.FusionServiceStub(channel)
        ingest(stub, [_ok(event_id="b-1", user_id="b")])
        profile = stub.GetProfile(fusion_pb2.GetProfileRequest(user_id="b"), timeout=10)
    assert profile.baseline and profile.model.name == "baseline_mean_pooling"
    assert proc.stop() == 0


def _kill_trials(stack, fusion_args, trials, amazon_users, tmp_path):
    """Ingest in a thread while fusion is SIGKILLed at random moments; then every
    acknowledged batch must come back as all duplicates. Returns (trials, acked events)."""
    rng = random.Random(7)
    users = list(amazon_users.items())
    acked: list[list[dict]] = []
    for trial in range(trials):
        proc = ServiceProcess("fusion", fusion_args, tmp_path / "fusion-run").start()
        proc.wait_ready(60)
        stop = threading.Event()

        def writer():
            with grpc.insecure_channel(proc.address) as channel:
                stub = fusion_pb2_grpc.FusionServiceStub(channel)
                n = 0
                while not stop.is_set():
                    user, events = users[n % len(users)]
                    batch = [dict(e, event_id=f"t{trial}-{n}-{e['event_id']}") for e in events]
                    n += 1
                    try:
                        ingest(stub, batch, timeout=10)
                    except grpc.RpcError:
                        return  # the server died: this batch was never acknowledged
                    acked.append(batch)
        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(rng.uniform(0.3, 1.5))
        proc.kill()
        stop.set()
        thread.join(30)
    proc = ServiceProcess("fusion", fusion_args, tmp_path / "fusion-run").start()
    proc.wait_ready(60)
    with grpc.insecure_channel(proc.address) as channel:
        stub = fusion_pb2_grpc.FusionServiceStub(channel)
        lost = sum(ingest(stub, batch).accepted for batch in acked)
    assert proc.stop() == 0
    return lost, sum(len(b) for b in acked)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_sigkill_during_ingest_loses_no_acknowledged_event(backend, stack, model_repo,
                                                           amazon_users, tmp_path, request):
    args = ["--model-repo", str(model_repo), "--embedding-address", stack["embedding"].address]
    if backend == "sqlite":
        args += ["--sqlite-path", str(tmp_path / "crash.sqlite3")]
    else:
        args += ["--store", "redis", "--redis-url", request.getfixturevalue("redis_url")[:-1] + "2"]
    lost, acked = _kill_trials(stack, args, 4, amazon_users, tmp_path)
    print(f"{backend}: 4 SIGKILL trials, {acked} acknowledged events, {lost} lost")
    assert acked > 0
    assert lost == 0, f"{lost} of {acked} acknowledged events were lost"


def test_an_explicit_weight_reaches_the_store(fusion):
    rated = dict(event_id="w-1", user_id="weighted", platform="movies", action=6,
                 item_id="m1", item_text="toy story", event_time_ms=NOW_MS, weight=4.5)
    ingest(fusion, [rated])
    profile = fusion.GetProfile(fusion_pb2.GetProfileRequest(
        user_id="weighted", recent_events_limit=1), timeout=10)
    assert profile.recent_events[0].event.weight == 4.5


@pytest.mark.parametrize("redis", ["one server", "cluster with replica acks"])
def test_redis_backend_serves_ingested_real_events_back(redis, stack, model_repo, amazon_users,
                                                         tmp_path, request):
    if redis == "one server":
        flags = ["--redis-url", request.getfixturevalue("redis_url")[:-1] + "3"]
    else:  # the session's cluster of 3 primaries + 3 replicas; no other test uses the prefix
        flags = ["--redis-url", request.getfixturevalue("redis_cluster_url"),
                 "--redis-replica-acks", "1"]
    proc = ServiceProcess("fusion", ["--model-repo", str(model_repo), "--store", "redis",
                                     *flags, "--embedding-address", stack["embedding"].address],
                          tmp_path).start().wait_ready(60)
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = fusion_pb2_grpc.FusionServiceStub(channel)
            users = list(amazon_users.items())[:5]
            for user, events in users:
                assert ingest(stub, events).accepted == len(events)
            for user, events in users:
                profile = stub.GetProfile(fusion_pb2.GetProfileRequest(
                    user_id=user, for_platform="arts_crafts"), timeout=10)
                assert profile.known and profile.total_events == len(events)
                assert len(profile.for_platform_vector) == 384
            stats = stub.GetItemStats(fusion_pb2.GetItemStatsRequest(platform="office"),
                                      timeout=10)
            office = sum(e["platform"] == "office" for _, es in users for e in es)
            assert sum(s.event_count for s in stats.items) == office
    finally:
        assert proc.stop() == 0
