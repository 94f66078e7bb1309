"""Service-to-service channels (services/common/remote.py) are built by the client library's
one channel builder: bounded reconnect backoff, its retry policy's codes, the token as
metadata once. Channels are lazy: nothing here connects."""

import json

from clients import crossrec_client
from services.common import remote
from services.common.security import ClientSecurity


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
