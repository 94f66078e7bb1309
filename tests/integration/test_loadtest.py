"""A short, bounded load test against the real services: correctness only, never timing."""

import grpc

from clients.loadtest import Workload, parse_args, run_load
from clients.stack import start_stack
from crossrec.common.v1 import common_pb2
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from clients.datasets import AMAZON, read_items


def test_mixed_load_at_low_rate_has_no_errors(model_repo, tmp_path, amazon_users):
    procs = start_stack(tmp_path, str(model_repo))
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
        workload = Workload(list(amazon_users), events, ["arts_crafts", "office"])
        for mode in ("closed", "open"):
            args = parse_args(["--ranking", procs["ranking"].address, "--fusion",
                               procs["fusion"].address, "--mode", mode, "--concurrency", "4",
                               "--rate", "20", "--duration-s", "2", "--warmup-s", "0.5",
                               "--max-requests", "400"])
            result = run_load(args, workload)
            assert result["errors"] == 0, result
            assert result["requests"] > 0 and result["client_overflow"] == 0
            assert set(result["rpcs"]) <= {"recommend", "ingest", "profile"}
    finally:
        codes = [p.stop() for p in reversed(list(procs.values()))]
    assert codes == [0, 0, 0]
