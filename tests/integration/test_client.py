"""clients.crossrec_client against real servers on loopback: typed round trips on real data,
deadlines, error classes with the servers' messages, gRPC retries across a ranking restart,
and TLS with a bearer token."""

import shutil
import socket
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clients.crossrec_client import (
    Action, Contribution, CrossrecClient, CrossrecError, DeadlineExceeded, EmbeddingClient,
    Event, IngestResult, InvalidArgument, Item, ModelRef, NotFound, RankingClient,
    ResourceExhausted, RetryPolicy, Source, Unauthenticated, Unavailable, error_from_rpc)
from tools.stack import ServiceProcess, health_status, start_stack
from crossrec.ranking.v1 import ranking_pb2
from dataio import AMAZON, read_items

# The client does not depend on model quality: these let the stack start before `make models`
# has trained the user tower and the ranker (with them exported, the flags change nothing).
STACK_FLAGS = {"ranking": ["--popularity-refresh-s", "1"]}


def dead_address() -> str:
    """A loopback address nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def stack(model_repo, tmp_path_factory):
    procs = start_stack(tmp_path_factory.mktemp("client-stack"), str(model_repo),
                        extra=STACK_FLAGS)
    yield procs
    codes = {name: p.stop() for name, p in reversed(list(procs.items()))}
    assert set(codes.values()) == {0}, codes


@pytest.fixture(scope="module")
def users(amazon_users) -> dict[str, list[Event]]:
    """Ten real users' history events, as client Events."""
    return {u: [Event.of(e) for e in es] for u, es in list(amazon_users.items())[:10]}


@pytest.fixture(scope="module")
def client(stack):
    with CrossrecClient(embedding=stack["embedding"].address, fusion=stack["fusion"].address,
                        ranking=stack["ranking"].address, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def loaded(client, users):
    """A small real catalogue (the users' items plus every 200th item) and the users' events,
    loaded through the client: (items upserted, IngestResult, progress reports)."""
    touched = {(e.platform, e.item_id) for es in users.values() for e in es}
    items = [Item.of(r) for n, r in enumerate(read_items(AMAZON))
             if (r["platform"], r["item_id"]) in touched or n % 200 == 0]
    upserted = sum(client.ranking.upsert_items(items[i:i + 500], timeout=300)
                   for i in range(0, len(items), 500))
    assert upserted == len(items)
    reports: list[IngestResult] = []
    events = [e for es in users.values() for e in es]
    result = client.fusion.ingest_stream(iter(events), batch_size=25, checkpoint_batches=2,
                                         progress=reports.append, timeout=300)
    return upserted, result, reports


def test_embed_returns_unit_float32_rows_in_request_order(client, stack, titles):
    vectors = client.embedding.embed(titles[:5])
    assert vectors.dtype == np.float32 and vectors.shape == (5, client.embedding.model_info().dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    with EmbeddingClient(stack["embedding"].address, max_texts_per_call=2) as small_calls:
        assert np.allclose(small_calls.embed(titles[:5]), vectors, atol=1e-5)
    assert np.allclose(client.embedding.embed(titles[2]), vectors[2:3], atol=1e-5)


def test_ingest_stream_acknowledges_every_event_checkpoint_by_checkpoint(loaded, users):
    _, result, reports = loaded
    total = sum(len(es) for es in users.values())
    assert result == IngestResult(accepted=total, duplicates=0, batches=-(-total // 25),
                                  events=total)
    assert reports[-1] == result and len(reports) == -(-total // 50)
    assert [r.events for r in reports] == sorted(r.events for r in reports)


def test_ingest_is_idempotent_by_event_id(client, loaded, users):
    events = next(iter(users.values()))[:5]
    assert client.fusion.ingest(events) == IngestResult(accepted=0, duplicates=5, batches=1,
                                                        events=5)


def test_profile_reads_back_the_ingested_history(client, loaded, users):
    user, events = next(iter(users.items()))
    profile = client.fusion.profile(user, for_platform="office", recent=3)
    assert profile.known and profile.user_id == user
    assert set(profile.platforms) == {e.platform for e in events}
    assert sum(p.event_count for p in profile.platforms.values()) == len(events)
    assert profile.total_events == len(events)
    assert abs(sum(p.fusion_weight for p in profile.platforms.values()) - 1) < 1e-4
    for vector in [profile.fused_vector, profile.for_platform_vector,
                   *(p.vector for p in profile.platforms.values())]:
        assert vector.dtype == np.float32 and vector.shape == (profile.dim,)
    newest = sorted(events, key=lambda e: e.event_time_ms)[-3:][::-1]
    assert [r.event.event_id for r in profile.recent_events] == [e.event_id for e in newest]
    assert all(isinstance(r.event.action, Action) and r.item_vector.shape == (profile.dim,)
               for r in profile.recent_events)


def test_recent_events_come_back_without_for_platform(client, loaded, users):
    user, events = next(iter(users.items()))
    profile = client.fusion.profile(user, recent=3)
    assert len(profile.recent_events) == 3


def test_an_unknown_user_has_an_empty_profile_not_an_error(client, loaded):
    profile = client.fusion.profile("nobody-at-all")
    assert not profile.known and profile.platforms == {} and profile.fused_vector is None


def test_recommend_returns_typed_items_with_string_sources(client, loaded, users):
    user = next(iter(users))
    recs = client.ranking.recommend(user, "office", k=5)
    assert len(recs) == 5 and recs.source == "personalised" == Source.PERSONALISED
    assert set(recs.platform_weights) == {"arts_crafts", "office"} and not recs.degraded
    assert any(m.name == "encoder" and m.version >= 1 for m in recs.models)
    assert all(isinstance(m, ModelRef) for m in recs.models)
    for item in recs:
        assert item.platform == "office" and item.title and item.explanation
        assert item.source == "personalised" and isinstance(item.source, str)
        assert item.contributions and all(isinstance(c, Contribution) for c in item.contributions)
    assert [i.score for i in recs] == sorted((i.score for i in recs), reverse=True)
    seen = {e.item_id for e in users[user] if e.platform == "office"}
    unseen = client.ranking.recommend(user, "office", k=20, exclude_seen=True)
    assert not {i.item_id for i in unseen} & seen


def test_item_stats_count_the_ingested_events(client, loaded, users):
    counts: dict[str, int] = {}
    for e in (e for es in users.values() for e in es if e.platform == "arts_crafts"):
        counts[e.item_id] = counts.get(e.item_id, 0) + 1
    stats = client.fusion.item_stats("arts_crafts")
    assert {s.item_id: s.event_count for s in stats} == counts
    assert [s.event_count for s in stats] == sorted(counts.values(), reverse=True)
    assert len(client.fusion.item_stats("arts_crafts", limit=2)) == 2


def test_delete_user_removes_the_profile_and_is_idempotent(client, loaded):
    events = [Event("delete-me", "office", f"tmp-{n}", "click", item_text=f"blue gel pen {n}")
              for n in range(3)]
    assert client.fusion.ingest(events).accepted == 3
    assert client.fusion.delete_user("delete-me") == 3
    assert not client.fusion.profile("delete-me").known
    assert client.fusion.delete_user("delete-me") == 0


def test_upserted_items_are_recommended_by_text_and_deleted_items_are_gone(client, loaded):
    item = Item("client-new-1", "office", "zorblax fluorescent neon highlighter markers",
                {"category": "office products writing highlighters"})
    session = [Event("", "office", "s-1", "click", item_text="neon highlighter markers")]
    assert client.ranking.upsert_items([item]) == 1
    recs = client.ranking.recommend("", "office", k=5, session_events=session)
    assert "client-new-1" in [r.item_id for r in recs]
    assert client.ranking.delete_items("office", ["client-new-1", "never-existed"]) == 1
    recs = client.ranking.recommend("", "office", k=5, session_events=session)
    assert "client-new-1" not in [r.item_id for r in recs]


def test_raw_stub_and_call_speak_protobuf(client, loaded, users):
    request = ranking_pb2.RecommendRequest(user_id=next(iter(users)), platform="office", k=3)
    reply = client.ranking.call("Recommend", request)
    assert isinstance(reply, ranking_pb2.RecommendResponse) and len(reply.items) == 3
    assert client.ranking.stub.Recommend(request, timeout=30) == reply
    with pytest.raises(InvalidArgument):
        client.ranking.call("Recommend", ranking_pb2.RecommendRequest(user_id="u", k=0))


def test_a_spent_deadline_raises_deadline_exceeded(client, titles):
    with pytest.raises(DeadlineExceeded) as err:
        client.embedding.embed(titles, timeout=0.001)
    assert err.value.code == "DEADLINE_EXCEEDED"
    assert str(err.value).startswith("DEADLINE_EXCEEDED: ")


@pytest.mark.parametrize("service, call, message", [
    ("ranking", lambda c: c.recommend("u", "office", k=0), "k must be in 1..1000, got 0"),
    ("ranking", lambda c: c.recommend("u", "video"), "platform 'video' has no catalogue"),
    ("fusion", lambda c: c.item_stats("Bad Platform"), "platform must match"),
    ("fusion", lambda c: c.ingest([Event("u", "office", "1", "click", weight=500.0,
                                         item_text="pen")]), "weight must be in (0, 100]"),
    ("embedding", lambda c: c.embed([""]), "texts[0] must hold a visible character"),
])
def test_a_bad_request_raises_invalid_argument_with_the_servers_message(
        client, loaded, service, call, message):
    with pytest.raises(InvalidArgument) as err:
        call(getattr(client, service))
    assert message in err.value.details
    assert str(err.value) == f"INVALID_ARGUMENT: {err.value.details}"
    assert "\n" not in str(err.value)


def test_a_bad_action_is_invalid_argument_before_any_call():
    with pytest.raises(InvalidArgument, match="action must be one of view, click"):
        Event("u", "office", "1", "dance")


def test_an_unreachable_service_raises_unavailable_once_retries_are_spent():
    with RankingClient(dead_address()) as ranking:
        with pytest.raises(Unavailable) as err:
            ranking.recommend("u", "office")
    assert str(err.value).startswith("UNAVAILABLE: ")


def test_every_call_shape_works_through_the_token_interceptor(stack, loaded):
    """Unary, concurrent futures (embed) and client streaming (ingest_stream) all pass the
    metadata interceptor; today's servers ignore the header."""
    with CrossrecClient(embedding=stack["embedding"].address, fusion=stack["fusion"].address,
                        ranking=stack["ranking"].address, token="t0ken", timeout_s=60) as c:
        assert c.embedding.embed(["red stapler", "gel pens"]).shape[0] == 2
        events = [Event("token-user", "office", f"tok-{n}", "view", item_text=f"pen {n}")
                  for n in range(3)]
        assert c.fusion.ingest_stream(events, batch_size=2).accepted == 3
        assert c.fusion.delete_user("token-user") == 3
        assert c.ranking.health() == "SERVING"


def test_omitted_services_are_refused_with_a_clear_message(stack):
    with CrossrecClient(ranking=stack["ranking"].address) as client:
        assert client.ranking.health() == "SERVING"
        with pytest.raises(ValueError, match="no fusion address"):
            client.fusion.profile("u")


class _FailedCall(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
    (grpc.StatusCode.NOT_FOUND, NotFound),
    (grpc.StatusCode.UNAVAILABLE, Unavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
    (grpc.StatusCode.INTERNAL, CrossrecError),
])
def test_every_status_maps_to_its_exception_class_with_a_one_line_message(code, cls):
    err = error_from_rpc(_FailedCall(code, "first line\n  second line"))
    assert type(err) is cls and isinstance(err, CrossrecError)
    assert str(err) == f"{code.name}: first line second line"


def test_a_call_made_while_ranking_restarts_succeeds_by_retrying(stack, client, loaded, users):
    """Stop ranking, bring a new process up on the same port a second later, and call in the
    gap. The default policy (about 3 s of backoff) is sized for connection resets and pod
    rollovers; a cold process start on a shared test machine can take longer, so this client
    widens the same gRPC retry policy to about 15 s. A client without retries fails in the
    same gap, so the success is the retry policy's doing."""
    old = stack["ranking"]
    address, port = old.address, old.port
    user = next(iter(users))
    with RankingClient(address, retry=RetryPolicy(initial_backoff_s=1.0, max_backoff_s=8.0),
                       timeout_s=60) as retrying, RankingClient(address, retry=None) as plain:
        assert len(retrying.recommend(user, "office", k=3)) == 3
        assert old.stop() == 0
        assert health_status(address) is None, "the old ranking still answers"
        with pytest.raises(Unavailable):
            plain.recommend(user, "office", k=3)

        replacement = ServiceProcess("ranking", old.args + ["--port", str(port)],
                                     old.run_dir / "restarted")
        stack["ranking"] = replacement  # the fixture stops it at the end
        failure: list[BaseException] = []

        def restart():
            time.sleep(1.0)
            try:
                replacement.start().wait_ready(120)
            except BaseException as err:  # noqa: BLE001 - reported by the test below
                failure.append(err)

        thread = threading.Thread(target=restart)
        thread.start()
        try:
            recs = retrying.recommend(user, "office", k=3)
        finally:
            thread.join()
        assert not failure, f"replacement did not start on port {port}: {failure[0]}"
        assert replacement.port == port and len(recs) == 3


# --- TLS and bearer token, against an in-process health server ------------------------------

def _make_certs(directory: Path) -> None:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=crossrec test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                 "extendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (directory / f"{name}.ext").write_text(ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=crossrec test {name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                "-extfile", f"{name}.ext")


class _RequireToken(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = ("authorization", f"Bearer {token}")

    def intercept_service(self, continuation, details):
        if self._expected in tuple(details.invocation_metadata):
            return continuation(details)
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                                   "bearer token missing or wrong"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls_and_bearer_token_reach_the_server(tmp_path):
    _make_certs(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[_RequireToken("s3cret")])
    checker = health.HealthServicer()
    checker.set(RankingClient.SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    credentials = grpc.ssl_server_credentials(
        [((tmp_path / "server.key").read_bytes(), (tmp_path / "server.pem").read_bytes())],
        root_certificates=(tmp_path / "ca.pem").read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    tls = dict(tls_ca=tmp_path / "ca.pem", tls_cert=tmp_path / "client.pem",
               tls_key=tmp_path / "client.key", retry=None, timeout_s=10)
    try:
        with RankingClient(f"127.0.0.1:{port}", token="s3cret", **tls) as ranking:
            assert ranking.health() == "SERVING"
        with RankingClient(f"127.0.0.1:{port}", token="wrong", **tls) as ranking:
            with pytest.raises(Unauthenticated, match="bearer token missing or wrong"):
                ranking.health()
        with RankingClient(f"127.0.0.1:{port}", token="s3cret", tls_ca=tmp_path / "ca.pem",
                           retry=None) as no_client_cert:
            with pytest.raises(Unavailable):
                no_client_cert.health()
        with pytest.raises(ValueError, match="both tls_cert and tls_key"):
            RankingClient(f"127.0.0.1:{port}", tls_cert=tmp_path / "client.pem")
    finally:
        server.stop(None)
