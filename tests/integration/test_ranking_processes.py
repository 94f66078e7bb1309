"""The ranking service as worker processes on one port (--processes), on the default SQLite
catalogue: a write acknowledged by one worker is served by every worker's next Recommend,
one scrape covers every worker, a worker killed with SIGKILL is replaced without losing an
acknowledged write, and SIGTERM under load drains every worker and exits 0."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request

import grpc
import pytest

from tools.stack import ServiceProcess, free_port, service_args, start_stack
from crossrec.common.v1 import common_pb2
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from services.common.serve import WORKER_METADATA_KEY
from tests.reliability.support import SERVING, ClosedLoop, frozen, health_of

PROCESSES = 2
FRESH_CONNECTIONS = 50
PLATFORM = "workers_test"
GRACE_S = 8.0
# How long a replaced worker may take to load before the test gives up (a bound, not a
# measurement).
RECOVER_WITHIN_S = 120.0
SESSION = [common_pb2.BehaviorEvent(platform="office", action=2, item_id="workers-seed",
                                    item_text="ergonomic mesh office chair with lumbar support",
                                    event_time_ms=int(time.time() * 1000))]
TITLES = {"desk": "standing desk converter", "lamp": "led desk lamp with usb port",
          "chair": "ergonomic mesh office chair", "mat": "anti fatigue standing mat"}


@pytest.fixture(scope="module")
def deps(model_repo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("processes")
    procs = start_stack(run_dir, str(model_repo), names=("embedding", "fusion"))
    yield procs, run_dir
    codes = {name: p.stop() for name, p in reversed(list(procs.items()))}
    assert set(codes.values()) == {0}, f"unclean exits: {codes}"


def start_ranking(model_repo, deps, name: str, *extra: str) -> ServiceProcess:
    procs, run_dir = deps
    args = service_args("ranking", str(model_repo), run_dir / name,
                        {n: p.address for n, p in procs.items()})
    return ServiceProcess("ranking", args + ["--processes", str(PROCESSES), *extra],
                          run_dir / name).start().wait_ready()


@pytest.fixture(scope="module")
def ranking(model_repo, deps):
    metrics_port, health_port = free_port(), free_port()
    proc = start_ranking(model_repo, deps, "shared", "--metrics-port", str(metrics_port),
                         "--health-port", str(health_port))
    proc.metrics_port, proc.health_address = metrics_port, f"127.0.0.1:{health_port}"
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def worker_pids(proc: ServiceProcess) -> set[int]:
    pid = proc.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def fresh_recommend(address: str) -> tuple[list[str] | None, str]:
    """(item ids Recommend answers on PLATFORM, None while that worker knows no item there;
    the worker that answered) over a new connection of its own."""
    # A local subchannel pool: a new TCP connection, not one shared with other channels.
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = ranking_pb2_grpc.RankingServiceStub(ch)
        try:
            reply, call = stub.Recommend.with_call(ranking_pb2.RecommendRequest(
                platform=PLATFORM, k=10, session_events=SESSION), timeout=30)
        except grpc.RpcError as err:
            worker = dict(err.trailing_metadata() or ()).get(WORKER_METADATA_KEY, "")
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no catalogue" in err.details():
                return None, worker
            raise
        return [i.item_id for i in reply.items], dict(call.trailing_metadata())[
            WORKER_METADATA_KEY]


def items(*ids: str) -> ranking_pb2.UpsertItemsRequest:
    return ranking_pb2.UpsertItemsRequest(items=[
        ranking_pb2.Item(item_id=i, platform=PLATFORM, title=TITLES.get(i, f"desk tray {i}"))
        for i in ids])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def served_everywhere(address: str, present: set[str], absent: set[str] = frozenset()
                      ) -> set[str]:
    """Recommend on FRESH_CONNECTIONS new connections; each answer holds every id of
    `present` and none of `absent`. Returns the workers that answered."""
    workers = set()
    for n in range(FRESH_CONNECTIONS):
        ids, worker = fresh_recommend(address)
        workers.add(worker)
        got = set(ids or ())
        assert present <= got and not (absent & got), \
            f"connection {n}, worker {worker}: {sorted(got)}, wanted {sorted(present)} " \
            f"without {sorted(absent)}"
    return workers


def test_a_write_through_one_connection_is_served_by_every_worker_at_once(ranking):
    with grpc.insecure_channel(ranking.address) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        reply, call = stub.UpsertItems.with_call(items("desk", "lamp", "chair"), timeout=60)
        assert reply.upserted == 3
        writer = dict(call.trailing_metadata())[WORKER_METADATA_KEY]
        workers = served_everywhere(ranking.address, {"desk", "lamp", "chair"})
        print(f"\nupsert through worker {writer}; {FRESH_CONNECTIONS} fresh connections "
              f"answered by workers {sorted(workers)}")
        assert len(workers) >= 2, "every connection landed on one worker: nothing shown"

        assert stub.DeleteItems(ranking_pb2.DeleteItemsRequest(
            platform=PLATFORM, item_ids=["lamp"]), timeout=60).deleted == 1
        workers = served_everywhere(ranking.address, {"desk", "chair"}, {"lamp"})
        assert len(workers) >= 2


def test_one_scrape_of_the_parent_counts_every_workers_calls(ranking):
    before = scrape(ranking.metrics_port)
    workers = {fresh_recommend(ranking.address)[1] for _ in range(20)}
    text = scrape(ranking.metrics_port)

    def recommends(page: str) -> float:
        found = re.search(r'crossrec_grpc_requests_total\{code="OK",method="Recommend",'
                          r'service="ranking"\} ([0-9.e+]+)', page)
        return float(found.group(1)) if found else 0.0

    assert len(workers) >= 2
    assert recommends(text) - recommends(before) == 20
    assert health_of(ranking.health_address) == SERVING, "the health-only port, every worker's"
    assert 'crossrec_ready{service="ranking"} 1.0' in text
    assert re.search(r'crossrec_model_version\{model="[^"]+",service="ranking"\} [1-9]', text)


def test_a_killed_worker_is_replaced_and_no_acknowledged_upsert_is_lost(ranking):
    before = worker_pids(ranking)
    assert len(before) == PROCESSES
    acknowledged, stop = [], threading.Event()

    def writer():
        with grpc.insecure_channel(ranking.address) as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            n = 0
            while not stop.is_set():
                item_id = f"kill-{n}"
                try:
                    stub.UpsertItems(items(item_id), timeout=10)
                    acknowledged.append(item_id)
                except grpc.RpcError:
                    time.sleep(0.05)  # this channel's worker was the one killed
                n += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        while len(acknowledged) < 3:
            time.sleep(0.05)
        os.kill(sorted(before)[0], signal.SIGKILL)
        deadline = time.monotonic() + RECOVER_WITHIN_S
        while not (len(worker_pids(ranking)) == PROCESSES and worker_pids(ranking) != before
                   and health_of(ranking.address, 5.0) == SERVING
                   and health_of(ranking.health_address, 5.0) == SERVING):
            assert time.monotonic() < deadline, ranking.log_tail()
            assert ranking.proc.poll() is None, ranking.log_tail()
            time.sleep(0.2)
        time.sleep(0.5)  # the writer goes on after the replacement is ready
    finally:
        stop.set()
        thread.join(30)
    after = worker_pids(ranking)
    print(f"\nworkers {sorted(before)} -> {sorted(after)}; {len(acknowledged)} upserts "
          "acknowledged meanwhile")
    assert len(after & before) == PROCESSES - 1
    # Every worker, the replacement included, serves every acknowledged upsert: k = 1000
    # returns the whole (small) platform, on fresh connections spread over the workers.
    workers = set()
    for n in range(FRESH_CONNECTIONS):
        ids, worker = fresh_recommend_all(ranking.address)
        workers.add(worker)
        missing = set(acknowledged) - set(ids)
        assert not missing, f"connection {n}, worker {worker}: acknowledged but not served: " \
            f"{sorted(missing)[:5]}"
    assert len(workers) >= 2


def fresh_recommend_all(address: str) -> tuple[list[str], str]:
    """Every item id on PLATFORM that a worker serves (k = 1000), over a new connection."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        reply, call = ranking_pb2_grpc.RankingServiceStub(ch).Recommend.with_call(
            ranking_pb2.RecommendRequest(platform=PLATFORM, k=1000, session_events=SESSION),
            timeout=30)
        return [i.item_id for i in reply.items], dict(call.trailing_metadata())[
            WORKER_METADATA_KEY]


def test_sigterm_under_load_drains_every_worker_and_the_parent_exits_0(model_repo, deps):
    procs, _ = deps
    victim = start_ranking(model_repo, deps, "drain", "--grace-s", str(GRACE_S))
    pids = worker_pids(victim)
    with grpc.insecure_channel(victim.address) as channel:
        ranking_pb2_grpc.RankingServiceStub(channel).UpsertItems(items("desk", "mat"),
                                                                 timeout=60)

    def recommend(channel, n, timeout=20.0):
        # Known users: Recommend asks fusion for a profile, so a frozen fusion holds it.
        return ranking_pb2_grpc.RankingServiceStub(channel).Recommend(
            ranking_pb2.RecommendRequest(user_id=f"drain-user-{n % 5}", platform=PLATFORM,
                                         k=2), timeout=timeout)

    loop = ClosedLoop(victim.address, recommend, callers=8).start()
    try:
        loop.wait_ok(16, 60)
        with frozen(procs["fusion"].proc.pid):
            time.sleep(0.6)  # every caller's next call now waits inside a worker
            sigterm_at = time.monotonic()
            victim.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert health_of(victim.address, 2.0) != SERVING
        code = victim.proc.wait(GRACE_S + 10)
        loop.stop()
    finally:
        loop.stop()
        victim.stop()
    in_flight = [c for c in loop.calls if c.started < sigterm_at - 0.3 < sigterm_at < c.ended]
    failed = [(c.code.name, c.details) for c in in_flight if c.code != grpc.StatusCode.OK]
    print(f"\n{len(loop.calls)} calls, {len(in_flight)} in flight at SIGTERM, exit {code}")
    assert in_flight, "no call was in flight at SIGTERM: the test proves nothing"
    assert not failed, failed[:3]
    assert code == 0
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")], "a worker outlived the parent"


def test_workers_that_cannot_start_stop_the_service_with_exit_1(tmp_path):
    proc = ServiceProcess("ranking", ["--processes", str(PROCESSES), "--model-repo",
                                      str(tmp_path / "no-models"), "--catalog-path",
                                      str(tmp_path / "catalog.sqlite3")], tmp_path).start()
    try:
        code = proc.proc.wait(60)
    finally:
        proc.stop()
    assert code == 1, proc.log_tail()
    assert "Refusing to start without a trained ranker" in proc.log_tail(50)
