"""OpenTelemetry tracing across the real services: with --otlp-endpoint pointing at a local
OTLP collector, one Recommend through the client is one trace holding ranking's, fusion's and
embedding's spans, each parented on the span that called it; the CLI continues a TRACEPARENT
from its environment; with tracing off no span is sent at all."""

import socket
import subprocess
import sys
import uuid

import pytest
from opentelemetry.sdk.trace import TracerProvider

from clients.crossrec_client import CrossrecClient, EmbeddingClient, Event, Item
from tools.stack import REPO, python_env, start_stack
from tools.trace_collector import TraceCollector
from dataio import AMAZON, read_items

RECOMMEND = "/crossrec.ranking.v1.RankingService/Recommend"
GET_PROFILE = "/crossrec.fusion.v1.FusionService/GetProfile"
EMBED = "/crossrec.embedding.v1.EmbeddingService/Embed"
STAGES = ("profile", "retrieve", "rank", "explain")
# Spans leave each service within a tenth of a second instead of the SDK's 5 s default.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}


@pytest.fixture(scope="module")
def collector():
    with TraceCollector() as c:
        yield c


def _stack(run_dir, model_repo, flags, env):
    extra = {"embedding": flags, "fusion": flags,
             "ranking": ["--popularity-refresh-s", "1", *flags]}
    return start_stack(run_dir, str(model_repo), extra=extra, env=env)


def _load(procs, user_events) -> Event:
    """A small real catalogue (the user's items and every 500th item) and the user's events;
    a session event of the user on a catalogue item that fusion has never seen."""
    touched = {(e["platform"], e["item_id"]) for e in user_events}
    items = [Item.of(r) for n, r in enumerate(read_items(AMAZON))
             if (r["platform"], r["item_id"]) in touched or n % 500 == 0]
    with CrossrecClient(fusion=procs["fusion"].address, ranking=procs["ranking"].address,
                        timeout_s=300) as client:
        client.ranking.upsert_items(items)
        client.fusion.ingest([Event.of(e) for e in user_events])
    user, platform = user_events[0]["user_id"], user_events[0]["platform"]
    other = next(i for i in items if i.platform == platform
                 and (i.platform, i.item_id) not in touched)
    return Event(user, platform, other.item_id, "click")


def _stop(procs):
    codes = {name: p.stop() for name, p in reversed(list(procs.items()))}
    assert set(codes.values()) == {0}, codes


@pytest.fixture(scope="module")
def traced(collector, model_repo, tmp_path_factory, amazon_users):
    procs = _stack(tmp_path_factory.mktemp("traced"), model_repo,
                   ["--otlp-endpoint", collector.endpoint], FAST_EXPORT)
    user = _load(procs, next(iter(amazon_users.values())))
    yield procs, user
    _stop(procs)


def _recommend_in_a_trace(procs, seen: Event, text: str) -> tuple[str, str]:
    """One Recommend with the session event `seen` under a new text (fusion embeds it;
    ranking finds the item's vector in its catalogue), inside a caller's span of a tracer
    provider of this test's own; (trace id, caller span id)."""
    tracer = TracerProvider().get_tracer("test")
    with CrossrecClient(ranking=procs["ranking"].address, timeout_s=60) as client, \
            tracer.start_as_current_span("caller") as caller:
        client.ranking.recommend(seen.user_id, seen.platform, k=5, session_events=[
            Event(seen.user_id, seen.platform, seen.item_id, "click", item_text=text)])
    ctx = caller.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def _one(spans, service, name):
    found = [s for s in spans if s.service == f"crossrec-{service}" and s.name == name]
    assert len(found) == 1, (service, name, [(s.service, s.name) for s in spans])
    return found[0]


def test_recommend_is_one_trace_from_ranking_through_fusion_to_embedding(traced, collector):
    procs, seen = traced
    text = f"hand-stitched linen notebook {uuid.uuid4().hex}"
    trace_id, caller_id = _recommend_in_a_trace(procs, seen, text)
    spans = collector.wait_for(lambda spans: any(
        s.trace_id == trace_id and s.name == "embedding.batch" for s in spans))
    # Spans already exported; those still queued arrive within the export delay.
    spans = collector.wait_for(lambda spans: len([s for s in spans if s.trace_id == trace_id])
                               >= 11)
    spans = [s for s in spans if s.trace_id == trace_id]

    recommend = _one(spans, "ranking", RECOMMEND)
    assert recommend.kind == "SERVER" and recommend.parent_id == caller_id
    stages = {name: _one(spans, "ranking", name) for name in STAGES}
    assert {s.parent_id for s in stages.values()} == {recommend.span_id}
    to_fusion = _one(spans, "ranking", GET_PROFILE)
    assert to_fusion.kind == "CLIENT" and to_fusion.parent_id == stages["profile"].span_id
    profile = _one(spans, "fusion", GET_PROFILE)
    assert profile.kind == "SERVER" and profile.parent_id == to_fusion.span_id
    to_embedding = _one(spans, "fusion", EMBED)
    assert to_embedding.kind == "CLIENT" and to_embedding.parent_id == profile.span_id
    embed = _one(spans, "embedding", EMBED)
    assert embed.kind == "SERVER" and embed.parent_id == to_embedding.span_id
    queue_wait = _one(spans, "embedding", "embedding.queue_wait")
    batch = _one(spans, "embedding", "embedding.batch")
    assert queue_wait.parent_id == batch.parent_id == embed.span_id
    assert batch.attributes["batch_texts"] >= 1 and queue_wait.end_ns <= batch.start_ns

    by_id = {s.span_id: s for s in spans}
    assert all(s.parent_id in by_id for s in spans if s is not recommend)
    values = " ".join(str(v) for s in spans for v in s.attributes.values())
    assert seen.user_id not in values and seen.item_id not in values and "linen" not in values


def test_cli_continues_the_trace_in_its_environment(traced, collector):
    procs, seen = traced
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    env = python_env({"TRACEPARENT": f"00-{trace_id}-{parent_id}-01"})
    run = subprocess.run([sys.executable, "-m", "tools.cli", "--ranking",
                          procs["ranking"].address, "recommend", "--user", seen.user_id,
                          "--platform", seen.platform, "-k", "3"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    spans = collector.wait_for(lambda spans: any(
        s.trace_id == trace_id and s.name == RECOMMEND for s in spans))
    recommend = _one([s for s in spans if s.trace_id == trace_id], "ranking", RECOMMEND)
    assert recommend.parent_id == parent_id


def test_tracing_off_sends_no_span(model_repo, tmp_path_factory, amazon_users):
    with TraceCollector() as collector:
        # The SDK's own endpoint variable points at this collector: only --otlp-endpoint
        # may turn export on.
        procs = _stack(tmp_path_factory.mktemp("untraced"), model_repo, [],
                       {**FAST_EXPORT, "CROSSREC_OTLP_ENDPOINT": "",
                        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint})
        try:
            seen = _load(procs, list(amazon_users.values())[1])
            _recommend_in_a_trace(procs, seen, f"new text {uuid.uuid4().hex}")
        finally:
            _stop(procs)
        # Every process has exited, so any span it held would have been flushed by now.
        assert collector.spans == []


def test_an_unreachable_collector_fails_no_call_and_the_server_exits_cleanly(
        start_service, model_repo, titles):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    embedding = start_service("embedding", "--model-repo", str(model_repo),
                              "--otlp-endpoint", dead, env=FAST_EXPORT)
    with EmbeddingClient(embedding.address) as client:
        assert client.embed(titles[:3]).shape[0] == 3
    # start_service's teardown asserts the server exits 0 after trying to flush its spans.


def test_a_sampling_ratio_outside_0_to_1_refuses_to_start(model_repo):
    run = subprocess.run([sys.executable, "-m", "services.embedding.server", "--port", "0",
                          "--model-repo", str(model_repo), "--trace-sample-ratio", "1.5"],
                         cwd=REPO, env=python_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert "--trace-sample-ratio must be in [0, 1], got 1.5" in run.stderr
