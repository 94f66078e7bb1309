"""Service-to-service channels (services/common/remote.py) are built by the client library's
one channel builder: bounded reconnect backoff, its retry policy's codes, the token as
metadata once; their Embed calls are cut by the client library's one chunking loop, and
servers and channels share one message-size limit. Channels are lazy: nothing here connects."""

import json

import grpc
import numpy as np
import pytest

from clients import crossrec_client
from clients.crossrec_client import ClientSecurity
from crossrec.embedding.v1 import embedding_pb2
from services.common import remote
from services.common.errors import BudgetSpent


def test_service_to_service_channels_come_from_the_client_librarys_builder(monkeypatch):
    built = []
    real = crossrec_client.open_channel

    def recording(address, services, **options):
        built.append((address, services, options))
        return real(address, services, **options)

    monkeypatch.setattr(remote, "open_channel", recording)
    security = ClientSecurity(token="t0ken")
    remote.EmbeddingRemote("127.0.0.1:1", security).close()
    remote.FusionRemote("127.0.0.1:2", security).close()
    assert [(a, s) for a, s, _ in built] == [
        ("127.0.0.1:1", ["crossrec.embedding.v1.EmbeddingService"]),
        ("127.0.0.1:2", ["crossrec.fusion.v1.FusionService"])]
    for _, services, options in built:
        assert options["token"] == "t0ken" and options["tls_ca"] is None
        retry = options["retry"]
        assert retry.retryable_codes == crossrec_client.RetryPolicy().retryable_codes
        channel = dict(crossrec_client.channel_options(services, retry))
        assert channel["grpc.max_reconnect_backoff_ms"] <= 1000
        assert channel["grpc.enable_retries"] == 1
        config = json.loads(channel["grpc.service_config"])["methodConfig"][0]["retryPolicy"]
        assert set(config["retryableStatusCodes"]) == {"UNAVAILABLE", "CANCELLED"}


def test_service_to_service_calls_retry_once_so_a_dependency_that_is_down_reads_unavailable():
    # Five attempts at each hop would multiply with the caller's own retries and outlast a
    # 3 s deadline against a dependency that is down (measured: 3.2 s, DEADLINE_EXCEEDED).
    retry = remote.UPSTREAM_RETRY
    assert retry.max_attempts == 2 and retry.max_backoff_s <= 0.1


class _Failed(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self):
        return "deadline passed"


class _Future:
    def __init__(self, texts, fail):
        self.texts, self.fail, self.cancelled = texts, fail, False

    def result(self):
        if self.fail:
            raise _Failed()
        return embedding_pb2.EmbedResponse(embeddings=[
            embedding_pb2.Embedding(values=[float(len(t)), 1.0]) for t in self.texts])

    def cancel(self):
        self.cancelled = True


class _Embed:
    """A stand-in for the Embed stub method: each text's row is [len(text), 1]; the call
    numbered `fail_at` fails with DEADLINE_EXCEEDED."""

    def __init__(self, fail_at=None):
        self.fail_at, self.futures, self.timeouts = fail_at, [], []

    def future(self, request, timeout):
        self.timeouts.append(timeout)
        self.futures.append(_Future(list(request.texts), len(self.futures) == self.fail_at))
        return self.futures[-1]


class _Stub:
    def __init__(self, embed):
        self.Embed = embed


def test_backends_and_services_cut_embed_calls_with_the_one_chunking_loop():
    texts = ["a", "bb", "ccc", "dddd", "eeeee"]
    client = crossrec_client.EmbeddingClient("127.0.0.1:1", max_texts_per_call=2)
    service = remote.EmbeddingRemote("127.0.0.1:1", max_texts_per_call=2)
    try:
        for target, call in ((client, lambda: client.embed(texts, timeout=3.0)),
                             (service, lambda: service(texts, 3.0))):
            embed = _Embed()
            target.stub = target._stub = _Stub(embed)
            rows = call()
            assert rows.dtype == np.float32 and rows.shape == (5, 2)
            assert rows[:, 0].tolist() == [1, 2, 3, 4, 5]
            assert [f.texts for f in embed.futures] == [["a", "bb"], ["ccc", "dddd"], ["eeeee"]]
            assert embed.timeouts == [3.0] * 3
    finally:
        client.close()
        service.close()


def test_a_failed_embed_chunk_cancels_the_others_and_reads_as_the_callers_error():
    client = crossrec_client.EmbeddingClient("127.0.0.1:1", max_texts_per_call=1)
    service = remote.EmbeddingRemote("127.0.0.1:1", max_texts_per_call=1)
    try:
        client.stub = _Stub(client_embed := _Embed(fail_at=1))
        with pytest.raises(crossrec_client.DeadlineExceeded, match="deadline passed"):
            client.embed(["a", "b", "c"])
        service._stub = _Stub(service_embed := _Embed(fail_at=1))
        with pytest.raises(BudgetSpent, match="embedding service at 127.0.0.1:1"):
            service(["a", "b", "c"])
        for embed in (client_embed, service_embed):
            assert all(f.cancelled for f in embed.futures)
    finally:
        client.close()
        service.close()


def test_servers_and_channels_share_one_message_size_limit():
    from clients.crossrec_client import limits
    from services.common import serve
    assert serve.MAX_MESSAGE_BYTES is limits.MAX_MESSAGE_BYTES
    options = dict(crossrec_client.channel_options(["x"], None))
    assert options["grpc.max_send_message_length"] == limits.MAX_MESSAGE_BYTES
    assert options["grpc.max_receive_message_length"] == limits.MAX_MESSAGE_BYTES
