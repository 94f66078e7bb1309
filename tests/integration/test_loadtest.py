"""Short, bounded load tests against the real services (tools/loadtest.py and the locust
user class in locustfile.py): correctness only, never timing."""

import csv
import subprocess
import sys

import grpc
import pytest

from tools.loadtest import Workload, parse_args, run_load
from tools.stack import REPO, python_env, start_stack
from crossrec.common.v1 import common_pb2
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from dataio import AMAZON, read_items

LOCUST_RUN_S = 4


@pytest.fixture(scope="module")
def stack(model_repo, tmp_path_factory, amazon_users):
    """The three services with 1,000 real items (every item the users touched among them)
    and the real events of the amazon_users; yields (processes, workload over those users)."""
    procs = start_stack(tmp_path_factory.mktemp("loadtest"), str(model_repo))
    try:
        touched = {(e["platform"], e["item_id"]) for es in amazon_users.values() for e in es}
        items = [r for n, r in enumerate(read_items(AMAZON))
                 if (r["platform"], r["item_id"]) in touched or n % 200 == 0]
        with grpc.insecure_channel(procs["ranking"].address) as channel:
            ranking_pb2_grpc.RankingServiceStub(channel).UpsertItems(
                ranking_pb2.UpsertItemsRequest(items=[ranking_pb2.Item(
                    item_id=r["item_id"], platform=r["platform"], title=r["title"])
                    for r in items[:1000]]), timeout=120)
        with grpc.insecure_channel(procs["fusion"].address) as channel:
            stub = fusion_pb2_grpc.FusionServiceStub(channel)
            for events in amazon_users.values():
                stub.Ingest(fusion_pb2.IngestRequest(events=[common_pb2.BehaviorEvent(
                    **{k: v for k, v in e.items() if v is not None}) for e in events]),
                    timeout=60)
        events = [e for es in amazon_users.values() for e in es]
        yield procs, Workload(list(amazon_users), events, ["arts_crafts", "office"])
    finally:
        codes = [p.stop() for p in reversed(list(procs.values()))]
    assert codes == [0, 0, 0]


def test_mixed_load_at_low_rate_has_no_errors(stack):
    procs, workload = stack
    for mode in ("closed", "open"):
        args = parse_args(["--ranking", procs["ranking"].address, "--fusion",
                           procs["fusion"].address, "--mode", mode, "--concurrency", "4",
                           "--rate", "20", "--duration-s", "2", "--warmup-s", "0.5",
                           "--max-requests", "400"])
        result = run_load(args, workload)
        assert result["errors"] == 0, result
        assert result["requests"] > 0 and result["client_overflow"] == 0
        assert set(result["rpcs"]) <= {"recommend", "ingest", "profile"}


def test_locust_run_headless_for_a_few_seconds_has_no_failures(stack, amazon_users, tmp_path):
    procs, _ = stack
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO / "locustfile.py"), "--headless",
         "-u", "4", "-r", "4", "-t", f"{LOCUST_RUN_S}s", "--stop-timeout", "5",
         "--ranking", procs["ranking"].address, "--fusion", procs["fusion"].address,
         "--data-users", str(len(amazon_users)), "--only-summary",
         "--csv", str(tmp_path / "locust")],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "locust_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows.pop("Aggregated")
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, total
    assert set(rows) <= {"Recommend", "Ingest", "GetProfile"}
    assert all(int(row["Failure Count"]) == 0 for row in rows.values())


def test_locust_refuses_a_target_that_is_not_loopback(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO / "locustfile.py"), "--headless",
         "-u", "1", "-t", "1s", "--ranking", "192.0.2.1:50053"],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "only loopback targets" in run.stderr
