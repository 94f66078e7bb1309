"""bench/ingest.py's cluster part: durable ingest through fusion on one Redis server and on
Redis Clusters of 1 and 3 primaries (with replicas, with replica acks), and what replica acks
add to one-event appends."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

from bench.common import process_cpu_s
from bench.stack_data import synthetic_stream
from clients.crossrec_client import FusionClient
from tools.redis_server import RedisClusterServers, RedisServer
from tools.stack import ServiceProcess, service_args

CLUSTER_ROWS = (
    # (name, primaries (0: one plain server), replicas per primary, --redis-replica-acks)
    ("1 primary", 0, 0, 0),
    ("1 primary, cluster mode", 1, 0, 0),
    ("3 primaries", 3, 0, 0),
    ("3 primaries + 3 replicas", 3, 1, 0),
    ("3 primaries + 3 replicas, replica acks 1", 3, 1, 1),
)
CLUSTER_ITEMS = 200
CLUSTER_USERS = 2000
CLUSTER_BATCH = 500
CLUSTER_CALLERS = 4


def cluster_events(items: list[tuple[str, str]], seed: int):
    """Endless fresh events (own ids, CLUSTER_USERS users) on the given (item_id, text)."""
    rng = random.Random(seed)
    n = 0
    while True:
        item, text = items[rng.randrange(len(items))]
        yield {"event_id": f"c{seed}-{n}", "user_id": f"cu{rng.randrange(CLUSTER_USERS)}",
               "platform": "amazon", "item_id": item, "item_text": text, "action": 2,
               "event_time_ms": 1_700_000_000_000 + n}
        n += 1


def cluster_row(run_dir: Path, model_repo: str, embedding: ServiceProcess, name: str,
                primaries: int, replicas: int, acks: int, items, seconds: float) -> dict:
    if primaries:
        redis = RedisClusterServers(run_dir / "redis", primaries, replicas).start()
        redis_pids, url = [n.proc.pid for n in redis.nodes], redis.url
    else:
        redis = RedisServer(run_dir / "redis").start()
        redis_pids, url = [redis.proc.pid], redis.url
    args = service_args("fusion", model_repo, run_dir, {"embedding": embedding.address})
    fusion = ServiceProcess("fusion", args + ["--store", "redis", "--redis-url", url,
                                              "--redis-replica-acks", str(acks)], run_dir)
    try:
        fusion.start().wait_ready()
        with FusionClient(fusion.address, timeout_s=60) as client:
            client.ingest([dict(e, event_id=f"warm-{i}") for i, e in enumerate(
                {"user_id": "warm", "platform": "amazon", "item_id": item, "item_text": text,
                 "action": 2, "event_time_ms": 1_700_000_000_000} for item, text in items)])
        acked = [0] * CLUSTER_CALLERS
        stop = threading.Event()

        def caller(i):
            stream = cluster_events(items, seed=i)
            with FusionClient(fusion.address, timeout_s=60) as client:
                while not stop.is_set():
                    batch = [next(stream) for _ in range(CLUSTER_BATCH)]
                    result = client.ingest(batch)
                    acked[i] += result.accepted + result.duplicates
        pids = {"fusion": [fusion.proc.pid], "redis": redis_pids,
                "embedding": [embedding.proc.pid], "client": [os.getpid()]}
        before = {k: sum(process_cpu_s(p) for p in v) for k, v in pids.items()}
        started = time.perf_counter()
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(CLUSTER_CALLERS)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        took = time.perf_counter() - started
        cpu = {k: round(sum(process_cpu_s(p) for p in v) - before[k], 2) for k, v in pids.items()}
    finally:
        fusion.stop()
        redis.stop()
        shutil.rmtree(run_dir / "redis", ignore_errors=True)
    total_cpu = sum(cpu.values())
    row = {"name": name, "primaries": max(primaries, 1), "replicas_per_primary": replicas,
           "cluster_mode": bool(primaries), "replica_acks": acks, "events": sum(acked),
           "seconds": round(took, 2), "events_per_s": round(sum(acked) / took, 1),
           "cpu_s": cpu, "cpu_share": {k: round(v / total_cpu, 3) for k, v in cpu.items()},
           "cores_busy": round(total_cpu / took, 2)}
    print(json.dumps(row), flush=True)
    return row


def replica_ack_cost(run_dir: Path, events, n: int = 400) -> dict:
    """Latency of one-event appends from one caller, in process, on 3 primaries + 3 replicas:
    fsynced on the primary vs also confirmed by its replica (WAIT 1), same cluster."""
    from services.fusion.redis_store import RedisProfileStore
    cluster = RedisClusterServers(run_dir / "redis", 3, 1).start()
    out = {}
    try:
        for acks, part in ((0, events[:n]), (1, events[n:2 * n])):
            store = RedisProfileStore(cluster.url, replica_acks=acks)
            took = []
            for e in part:
                started = time.perf_counter()
                store.append([e])
                took.append(time.perf_counter() - started)
            store.close()
            took.sort()
            out[f"replica_acks_{acks}"] = {
                "appends": n, "p50_ms": round(took[n // 2] * 1000, 3),
                "p99_ms": round(took[int(n * 0.99)] * 1000, 3),
                "events_per_s": round(n / sum(took), 1)}
    finally:
        cluster.stop()
        shutil.rmtree(run_dir / "redis", ignore_errors=True)
    out["p50_ratio_acks_1_vs_0"] = round(out["replica_acks_1"]["p50_ms"]
                                         / out["replica_acks_0"]["p50_ms"], 2)
    print(json.dumps(out), flush=True)
    return out


def cluster_bench(run_dir: Path, model_repo: str, seconds: float) -> dict:
    """The CLUSTER_ROWS through fusion on one embedding service, and their ratios."""
    items = []
    for e in synthetic_stream(5000):
        if e.item_text and e.item_id not in {i for i, _ in items}:
            items.append((e.item_id, e.item_text))
        if len(items) == CLUSTER_ITEMS:
            break
    run_dir.mkdir(parents=True, exist_ok=True)
    embedding = ServiceProcess("embedding", service_args("embedding", model_repo, run_dir, {}),
                               run_dir).start()
    try:
        embedding.wait_ready()
        rows = [cluster_row(run_dir, model_repo, embedding, *row, items, seconds)
                for row in CLUSTER_ROWS]
    finally:
        embedding.stop()
    single = replica_ack_cost(run_dir, synthetic_stream(800, seed=1))
    rate = {r["name"]: r["events_per_s"] for r in rows}
    return {"params": {"seconds": seconds, "callers": CLUSTER_CALLERS,
                       "batch": CLUSTER_BATCH, "users": CLUSTER_USERS, "items": CLUSTER_ITEMS,
                       "fusion_processes": 1},
            "rows": rows, "single_event_appends_in_process": single,
            "ratios": {
                "3_primaries_vs_1_primary": round(rate["3 primaries"] / rate["1 primary"], 2),
                "3_primaries_vs_1_primary_cluster_mode": round(
                    rate["3 primaries"] / rate["1 primary, cluster mode"], 2),
                "cluster_mode_vs_plain_1_primary": round(
                    rate["1 primary, cluster mode"] / rate["1 primary"], 2),
                "replica_acks_1_vs_none": round(
                    rate["3 primaries + 3 replicas, replica acks 1"]
                    / rate["3 primaries + 3 replicas"], 2)}}
