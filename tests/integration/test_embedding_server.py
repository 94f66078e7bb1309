"""The real embedding server as a process on 127.0.0.1, over gRPC."""

import concurrent.futures as cf
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc

SERVICE = "crossrec.embedding.v1.EmbeddingService"


@pytest.fixture(scope="module")
def server(model_repo, tmp_path_factory):
    from tools.stack import ServiceProcess
    proc = ServiceProcess("embedding", ["--model-repo", str(model_repo)],
                          tmp_path_factory.mktemp("embedding")).start().wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield embedding_pb2_grpc.EmbeddingServiceStub(channel)


def embed(stub, texts, **kw):
    reply = stub.Embed(embedding_pb2.EmbedRequest(texts=texts), timeout=30, **kw)
    return np.array([list(e.values) for e in reply.embeddings], dtype=np.float32), reply


def test_health_is_serving_and_reflection_lists_the_service(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_served_vectors_match_the_torch_reference_on_real_titles(stub, titles, encoder_dir):
    from export.encoder_reference import torch_reference
    from recmodel.modelrepo import read_meta
    served, reply = embed(stub, titles[:32])
    reference = torch_reference(read_meta(encoder_dir)["source_model"]["path"])(titles[:32])
    assert np.abs(served - reference).max() <= 1e-4
    cosine = (served * reference).sum(1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999
    assert reply.dim == 384 and reply.model.name == "encoder" and reply.model.version >= 1


def test_model_info_describes_the_served_model(stub):
    info = stub.ModelInfo(embedding_pb2.ModelInfoRequest(), timeout=5)
    assert info.dim == 384 and info.max_sequence_tokens == 256
    assert info.provider == "CPUExecutionProvider" and info.precision == "fp32"
    assert info.max_texts_per_request == 256


def test_truncation_is_reported(stub):
    _, reply = embed(stub, ["paint " * 1000, "glue"])
    assert reply.embeddings[0].truncated and reply.embeddings[0].token_count == 256
    assert not reply.embeddings[1].truncated


def test_concurrent_callers_get_their_own_vectors(stub, titles):
    alone = {t: embed(stub, [t])[0][0] for t in titles[:8]}
    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda t: (t, embed(stub, [t])[0][0]), titles[:8] * 4))
    for text, vector in got:
        np.testing.assert_allclose(vector, alone[text], atol=1e-5)


@pytest.mark.parametrize("texts, fragment", [
    ([], "texts must hold at least 1 text, got 0"),
    (["fine", ""], "texts[1] must hold a visible character"),
    (["t"] * 257, "texts must hold at most 256 texts, got 257"),
])
def test_bad_input_is_invalid_argument_naming_the_field(stub, texts, fragment):
    with pytest.raises(grpc.RpcError) as err:
        embed(stub, texts)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()


def test_non_utf8_bytes_are_invalid_argument_naming_the_field(server):
    raw = b"\x0a\x04ok!!" + b"\x0a\x02\xff\xfe"  # texts[0]="ok!!", texts[1]=invalid UTF-8
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Embed", request_serializer=None,
                                   response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(raw, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[1]" in err.value.details() and "UTF-8" in err.value.details()


@pytest.fixture(scope="module")
def tiny_queue_server(model_repo, tmp_path_factory):
    """A server whose queue holds one request of 8 texts, batching 8 texts at most."""
    from tools.stack import ServiceProcess
    proc = ServiceProcess("embedding", [
        "--model-repo", str(model_repo), "--max-queue-texts", "8", "--max-texts-per-request",
        "8", "--max-batch-size", "8", "--max-delay-ms", "0"],
        tmp_path_factory.mktemp("tiny")).start().wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def _flood(address, n_calls, timeout_s):
    """n_calls concurrent Embed calls of 8 long texts; status code per call."""
    long_texts = [f"{i} " + "acrylic paint brush canvas " * 40 for i in range(8)]
    start = threading.Barrier(n_calls)
    with grpc.insecure_channel(address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)

        def call(_):
            start.wait()
            try:
                stub.Embed(embedding_pb2.EmbedRequest(texts=long_texts), timeout=timeout_s)
                return grpc.StatusCode.OK
            except grpc.RpcError as err:
                return err.code()
        with cf.ThreadPoolExecutor(n_calls) as pool:
            return list(pool.map(call, range(n_calls)))


def test_a_full_queue_answers_resource_exhausted_at_once(tiny_queue_server):
    codes = _flood(tiny_queue_server.address, 24, timeout_s=60)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_an_expired_deadline_is_deadline_exceeded(tiny_queue_server):
    codes = _flood(tiny_queue_server.address, 6, timeout_s=0.05)
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes


def test_sigterm_lets_in_flight_calls_finish_then_exits_zero(model_repo, tmp_path, titles):
    from tools.stack import ServiceProcess
    proc = ServiceProcess("embedding", ["--model-repo", str(model_repo), "--grace-s", "60"],
                          tmp_path).start()
    proc.wait_ready()
    with grpc.insecure_channel(proc.address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        slow = [f"{t} " * 3 for t in titles * 4]  # 256 texts: about a second of work
        future = stub.Embed.future(embedding_pb2.EmbedRequest(texts=slow), timeout=60)
        time.sleep(0.2)
        proc.proc.send_signal(signal.SIGTERM)
        assert len(future.result().embeddings) == len(slow)
    assert proc.proc.wait(30) == 0


def test_a_long_request_over_the_token_budget_is_invalid_argument(model_repo, tmp_path):
    from tools.stack import ServiceProcess
    proc = ServiceProcess("embedding", ["--model-repo", str(model_repo),
                                        "--max-request-tokens", "512"], tmp_path).start()
    try:
        proc.wait_ready()
        with grpc.insecure_channel(proc.address) as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            assert embed(stub, ["pens"] * 8)[0].shape == (8, 384)
            with pytest.raises(grpc.RpcError) as err:
                embed(stub, ["word " * 300] * 3)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max-request-tokens" in err.value.details()
    finally:
        assert proc.stop() == 0, proc.log_tail()


def test_small_calls_keep_a_1s_deadline_while_another_caller_sends_256_long_texts(
        stub, titles):
    """Fairness: the long requests' chunks interleave with the small calls (batcher.py)."""
    long_texts = [f"{n} " + "a long catalogue description of a product " * 100
                  for n in range(256)]  # ~4 KB each, cut at 256 tokens
    stop = threading.Event()
    big_done = []

    def big_caller():
        while not stop.is_set():
            embed(stub, long_texts)
            big_done.append(1)

    thread = threading.Thread(target=big_caller)
    thread.start()
    time.sleep(1.0)  # the first long request is running
    latencies = []
    try:
        for n in range(40):
            started = time.perf_counter()
            reply = stub.Embed(embedding_pb2.EmbedRequest(texts=[titles[n]]), timeout=1.0)
            latencies.append(time.perf_counter() - started)
            assert len(reply.embeddings) == 1
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(120)
    print(f"single-title p50 {np.percentile(latencies, 50) * 1e3:.0f} ms, "
          f"p99 {np.percentile(latencies, 99) * 1e3:.0f} ms, max {max(latencies) * 1e3:.0f} ms, "
          f"with {len(big_done)} long requests done meanwhile")
    assert big_done, "the long requests must finish too"
