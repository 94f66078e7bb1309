"""Every service exposes Prometheus metrics on its own port, with conventional names."""

import urllib.request

import grpc
import pytest

from tools.stack import free_port, start_stack
from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc


@pytest.fixture(scope="module")
def stack(model_repo, tmp_path_factory):
    ports = {name: free_port() for name in ("embedding", "fusion", "ranking")}
    procs = start_stack(tmp_path_factory.mktemp("metrics"), str(model_repo),
                        extra={n: ["--metrics-port", str(p)] for n, p in ports.items()})
    yield procs, ports
    for proc in reversed(list(procs.values())):
        assert proc.stop() == 0


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def test_rpc_counts_by_method_and_code_and_batcher_metrics(stack):
    procs, ports = stack
    with grpc.insecure_channel(procs["embedding"].address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        stub.Embed(embedding_pb2.EmbedRequest(texts=["stapler", "glue"]), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Embed(embedding_pb2.EmbedRequest(texts=[]), timeout=10)
    text = scrape(ports["embedding"])
    assert ('crossrec_grpc_requests_total{code="OK",method="Embed",service="embedding"}'
            in text)
    assert ('crossrec_grpc_requests_total{code="INVALID_ARGUMENT",method="Embed",'
            'service="embedding"}' in text)
    assert "crossrec_grpc_request_duration_seconds_bucket" in text
    assert "crossrec_embedding_queue_texts" in text
    assert "crossrec_embedding_batch_size_texts_count" in text
    assert 'crossrec_model_info{model="encoder",precision="fp32"' in text
    assert 'crossrec_ready{service="embedding"} 1.0' in text


def test_ranking_and_fusion_expose_their_own_metrics(stack):
    procs, ports = stack
    with grpc.insecure_channel(procs["ranking"].address) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        stub.UpsertItems(ranking_pb2.UpsertItemsRequest(items=[ranking_pb2.Item(
            item_id="m1", platform="office", title="paper shredder")]), timeout=30)
        stub.Recommend(ranking_pb2.RecommendRequest(user_id="nobody", platform="office", k=1),
                       timeout=10)
    ranking = scrape(ports["ranking"])
    assert 'crossrec_ranking_recommendations_total{source="popularity"} 1.0' in ranking
    assert 'crossrec_ranking_catalog_items{platform="office"} 1.0' in ranking
    assert 'crossrec_ranking_stage_duration_seconds_count{stage="profile"}' in ranking
    fusion = scrape(ports["fusion"])
    assert 'method="GetProfile",service="fusion"' in fusion
    assert "crossrec_fusion_store_duration_seconds" in fusion


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp{,6})."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:
                continue
            if width == 8:
                found.add(".".join(str(b) for b in bytes.fromhex(address)[::-1]))
            else:
                found.add("::" if int(address, 16) == 0 else address)
    return found


def test_metrics_listen_on_the_servers_host_not_on_every_interface(stack):
    _, ports = stack
    bound = {name: listening_addresses(port) for name, port in ports.items()}
    print(f"\n/metrics bound to: {bound}")
    assert bound == {name: {"127.0.0.1"} for name in ports}, bound


def test_an_event_id_resent_with_other_content_is_reported_as_a_conflict(stack):
    from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
    procs, ports = stack

    def batch(item_id: str, weight: float = 1.0):
        return fusion_pb2.IngestRequest(events=[dict(
            event_id="conflict-1", user_id="conflict-user", platform="office", action=2,
            item_id=item_id, item_text="conflict test stapler", event_time_ms=1_700_000_000_000,
            weight=weight)])

    with grpc.insecure_channel(procs["fusion"].address) as channel:
        stub = fusion_pb2_grpc.FusionServiceStub(channel)
        first = stub.Ingest(batch("c-item"), timeout=30)
        resent = stub.Ingest(batch("c-item"), timeout=30)
        changed = stub.Ingest(batch("other-item"), timeout=30)
        streamed = stub.IngestStream(iter([batch("c-item", 2.0), batch("c-item")]), timeout=30)
    assert (first.accepted, first.conflicts) == (1, 0)
    assert (resent.duplicates, resent.conflicts) == (1, 0), "a plain re-send is no conflict"
    assert (changed.accepted, changed.duplicates, changed.conflicts) == (0, 1, 1)
    assert (streamed.duplicates, streamed.conflicts) == (2, 1)
    assert "crossrec_fusion_event_conflicts_total 2.0" in scrape(ports["fusion"])
