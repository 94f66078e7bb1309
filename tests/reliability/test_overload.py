"""Overload at 10x capacity: an embedding server with a small queue and few concurrent RPCs,
flooded by ten times as many concurrent callers. Excess calls are refused RESOURCE_EXHAUSTED
much faster than served calls take, memory stays bounded, and a normal call succeeds after."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from tools.stack import ServiceProcess
from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from tests.reliability.support import is_alive_and_serving, percentile, rss_kib

CAPACITY_RPCS = 8
TEXTS_PER_CALL = 8
# The queue holds the texts of 4 calls while 8 may run at once: both limits get hit.
QUEUE_TEXTS = 4 * TEXTS_PER_CALL
CALLERS = 10 * CAPACITY_RPCS
MAX_CALLS = 50_000
CALL_DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def small_embedding(model_repo, tmp_path_factory):
    proc = ServiceProcess("embedding", [
        "--model-repo", str(model_repo), "--max-concurrent-rpcs", str(CAPACITY_RPCS),
        "--workers", str(CAPACITY_RPCS), "--max-batch-size", str(TEXTS_PER_CALL),
        "--max-texts-per-request", str(TEXTS_PER_CALL), "--max-queue-texts", str(QUEUE_TEXTS)],
        tmp_path_factory.mktemp("small-embedding")).start().wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


async def flood(address: str, texts: list[str], callers: int, duration_s: float):
    """`callers` concurrent closed-loop callers for `duration_s` (at most MAX_CALLS calls):
    [(code, seconds, details)] of every call."""
    results: list[tuple[grpc.StatusCode, float, str]] = []
    stop_at = time.monotonic() + duration_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)

        async def caller(i: int):
            n = i
            while time.monotonic() < stop_at and len(results) < MAX_CALLS:
                start = (n * TEXTS_PER_CALL) % len(texts)
                request = embedding_pb2.EmbedRequest(
                    texts=(texts + texts)[start:start + TEXTS_PER_CALL])
                started = time.perf_counter()
                try:
                    await stub.Embed(request, timeout=CALL_DEADLINE_S)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.aio.AioRpcError as err:
                    code, details = err.code(), err.details() or ""
                results.append((code, time.perf_counter() - started, details))
                n += callers
                # Refusals come back at once; yield so that the loop stays fair.
                await asyncio.sleep(0)
        await asyncio.gather(*(caller(i) for i in range(callers)))
    return results


class RssSampler:
    """Samples a process's VmRSS every `every_s` in a side thread (bounded by `limit_s`)."""

    def __init__(self, pid: int, every_s: float = 0.05, limit_s: float = 120.0):
        self.pid, self.samples = pid, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s, limit_s), daemon=True)
        self._thread.start()

    def _run(self, every_s, limit_s):
        deadline = time.monotonic() + limit_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.samples.append(rss_kib(self.pid))
            self._stop.wait(every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return max(self.samples)


def run_flood(server: ServiceProcess, titles: list[str], duration_s: float) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        for n in range(20):  # warm-up: allocator, tokenizer and ORT arenas at their size
            stub.Embed(embedding_pb2.EmbedRequest(texts=titles[n:n + TEXTS_PER_CALL]),
                       timeout=30)
    rss_warm = rss_kib(server.proc.pid)
    sampler = RssSampler(server.proc.pid)
    started = time.monotonic()
    try:
        results = asyncio.run(flood(server.address, titles, CALLERS, duration_s))
    finally:
        rss_peak = sampler.stop()
    flood_s = time.monotonic() - started
    time.sleep(0.5)
    with grpc.insecure_channel(server.address) as channel:
        after = embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
            embedding_pb2.EmbedRequest(texts=titles[:TEXTS_PER_CALL]), timeout=CALL_DEADLINE_S)
    rss_after = rss_kib(server.proc.pid)

    served = [s for c, s, _ in results if c == grpc.StatusCode.OK]
    refused = [s for c, s, _ in results if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    others = {(c.name, d) for c, _, d in results
              if c not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)}
    reasons = {d.split(" (")[0].split(";")[0] for c, _, d in results
               if c == grpc.StatusCode.RESOURCE_EXHAUSTED}
    print(f"\noverload: {CALLERS} callers on {CAPACITY_RPCS} concurrent RPCs, queue "
          f"{QUEUE_TEXTS} texts, {flood_s:.1f} s: {len(results)} calls, {len(served)} "
          f"served, {len(refused)} refused RESOURCE_EXHAUSTED {sorted(reasons)}")
    if served and refused:
        print(f"  refused p50 {percentile(refused, 50) * 1000:.2f} ms, p99 "
              f"{percentile(refused, 99) * 1000:.2f} ms; served p50 "
              f"{percentile(served, 50) * 1000:.1f} ms, p99 {percentile(served, 99) * 1000:.1f}"
              f" ms; ratio served p50 / refused p50 = "
              f"{percentile(served, 50) / percentile(refused, 50):.0f}x")
    print(f"  RSS warm {rss_warm / 1024:.0f} MiB, peak {rss_peak / 1024:.0f} MiB, after "
          f"{rss_after / 1024:.0f} MiB ({len(sampler.samples)} samples)")

    assert not others, f"codes other than OK / RESOURCE_EXHAUSTED: {sorted(others)[:5]}"
    assert served and refused, "the flood neither saturated nor was served"
    assert all(d for c, _, d in results if c == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert percentile(refused, 50) * 5 < percentile(served, 50)
    assert percentile(refused, 99) < percentile(served, 50)
    assert rss_peak < 2 * rss_warm
    assert len(after.embeddings) == TEXTS_PER_CALL
    assert is_alive_and_serving(server)


def test_a_flood_at_ten_times_capacity_is_refused_fast_in_bounded_memory_and_recovers(
        small_embedding, titles):
    run_flood(small_embedding, titles, duration_s=4)


@pytest.mark.slow
def test_a_long_flood_at_ten_times_capacity_keeps_memory_bounded(small_embedding, titles):
    run_flood(small_embedding, titles, duration_s=30)
