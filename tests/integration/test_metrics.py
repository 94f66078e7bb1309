"""Every service exposes Prometheus metrics on its own port, with conventional names."""

import urllib.request

import grpc
import pytest

from clients.stack import _free_port, start_stack
from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc


@pytest.fixture(scope="module")
def stack(model_repo, tmp_path_factory):
    ports = {name: _free_port() for name in ("embedding", "fusion", "ranking")}
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
