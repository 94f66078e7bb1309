"""Ingest benchmark: durable events/s of the profile store backends, single-event vs batched,
then the whole of MovieLens-1M through the running embedding + fusion services over gRPC.
Writes bench/results/ingest.{json,png}.

    .venv/bin/python bench/ingest.py [--store-events 100000] [--movielens-limit 0]
    .venv/bin/python bench/ingest.py --cluster-only [--cluster-seconds 10]

Store part (in-process, real events, both backends on this machine, fixed seed): every append
returns only once its events are durable (SQLite WAL + synchronous=FULL; Redis AOF with
appendfsync always). "single" = one event per call from one caller; "single x16" = one event
per call from 16 concurrent callers (group commit merges them); "batch" = 1,000 events per call.

MovieLens part: `python -m services.embedding.server` and `python -m services.fusion.server`
(SQLite) on 127.0.0.1; 4 concurrent client streams (IngestStream, 1,000 events per message,
users split by hash) send all 1,000,209 ratings; item titles are embedded by the fusion
service through the embedding service, each once. Progress is printed every 5 s.

Cluster part (`cluster` in the results; `--cluster-only` runs it alone and replaces that key
in an existing ingest.json): one embedding service, then per row a fresh Redis and a fusion
service on it (`--store redis`): one primary (redis://), the same as a 1-node cluster,
3 primaries, 3 primaries + 3 replicas, and that with `--redis-replica-acks 1`. Each row warms
the store's item vectors (200 real items, embedded once), then 4 callers send Ingest batches
of 500 fresh events (2,000 users) for `--cluster-seconds`; durable events/s, and the CPU
seconds of each process kind (fusion, redis, embedding, this client) over the timed window.
Then, in process on 3 primaries + 3 replicas, the latency of one-event appends with and
without replica acks (what WAIT adds to one acknowledgement).
Everything shares the machine's cores, so the ratios between rows and the CPU split are the
result, not the absolute rates.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "gen"), str(REPO)]

from clients.crossrec_client import FusionClient  # noqa: E402
from tools.redis_server import RedisClusterServers, RedisServer  # noqa: E402
from tools.stack import ServiceProcess, service_args, start_stack  # noqa: E402
from dataio import (AMAZON, MOVIELENS, item_texts, iter_events, to_event,  # noqa: E402
                    user_events)
from services.common.validation import validate_event  # noqa: E402
from services.fusion.sqlite_store import SQLiteProfileStore  # noqa: E402

RESULTS = REPO / "bench" / "results"


def synthetic_stream(n: int, seed: int = 0):
    """n validated events: real Amazon events copied under fresh user and event ids."""
    users = list(user_events(AMAZON, users=500).values())
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        events = users[rng.randrange(len(users))]
        copy = f"b{len(out)}"
        for e in events:
            out.append(validate_event(**dict(e, user_id=f"{copy}:{e['user_id']}",
                                             event_id=f"{copy}:{e['event_id']}"), field="e"))
    return out[:n]


def rate(fn, n_events: int) -> dict:
    started = time.perf_counter()
    fn()
    took = time.perf_counter() - started
    return {"events": n_events, "seconds": round(took, 3),
            "events_per_s": round(n_events / took, 1)}


def store_bench(make_store, events, single_n: int) -> dict:
    store = make_store()
    out = {}
    try:
        single = events[:single_n]
        out["single"] = rate(lambda: [store.append([e]) for e in single], len(single))
        concurrent = events[single_n:single_n * 3]

        def worker(part):
            for e in part:
                store.append([e])
        parts = [concurrent[i::16] for i in range(16)]

        def run16():
            threads = [threading.Thread(target=worker, args=(p,)) for p in parts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        out["single_x16"] = rate(run16, len(concurrent))
        batched = events[single_n * 3:]
        out["batch_1000"] = rate(lambda: [store.append(batched[i:i + 1000])
                                          for i in range(0, len(batched), 1000)], len(batched))
    finally:
        store.close()
    return out


def movielens_rows(limit: int):
    return itertools.islice(iter_events(MOVIELENS), limit or None)


def movielens_bulk(run_dir: Path, model_repo: str, limit: int, streams: int = 4) -> dict:
    texts = item_texts(MOVIELENS)
    parts: list[list[dict]] = [[] for _ in range(streams)]
    for row in movielens_rows(limit):
        e = to_event(row, texts)
        parts[hash(e["user_id"]) % streams].append(e)
    total = sum(len(p) for p in parts)
    procs = start_stack(run_dir, model_repo, names=("embedding", "fusion"))
    acked = [0] * streams
    results: list = [None] * streams
    progress = []
    try:
        def stream(i):
            with FusionClient(procs["fusion"].address, timeout_s=900) as client:
                results[i] = client.ingest_stream(
                    parts[i], progress=lambda r: acked.__setitem__(i, r.accepted + r.duplicates))
        started = time.perf_counter()
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=5 / streams)
            done, took = sum(acked), time.perf_counter() - started
            progress.append((round(took, 1), done))
            print(f"  movielens: {done:>9,}/{total:,} events acknowledged (durable)  "
                  f"{took:6.0f} s  {done / took:8,.0f} events/s", flush=True)
        took = time.perf_counter() - started
    finally:
        codes = {n: p.stop() for n, p in reversed(list(procs.items()))}
    accepted = sum(r.accepted for r in results if r)
    return {"events": total, "accepted": accepted,
            "duplicates": sum(r.duplicates for r in results if r), "seconds": round(took, 1),
            "events_per_s": round(total / took, 1), "streams": streams, "items": len(texts),
            "progress": progress, "exit_codes": codes, "target_s": 300,
            "target_met": accepted == total and took <= 300}


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


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        before = {k: sum(cpu_s(p) for p in v) for k, v in pids.items()}
        started = time.perf_counter()
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(CLUSTER_CALLERS)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        took = time.perf_counter() - started
        cpu = {k: round(sum(cpu_s(p) for p in v) - before[k], 2) for k, v in pids.items()}
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


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, values = [], []
    for backend, modes in results["store"].items():
        for mode, r in modes.items():
            labels.append(f"{backend}\n{mode}")
            values.append(r["events_per_s"])
    axes[0].bar(labels, values, color=["#4c72b0"] * 3 + ["#dd8452"] * 3)
    axes[0].axhline(20000, color="k", ls="--", lw=1, label="target 20k/s batched (SQLite)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("durable events/s (log)")
    axes[0].set_title("profile store: durable appends")
    axes[0].legend()
    ml = results.get("movielens")
    if ml:
        t, n = zip(*([(0, 0)] + ml["progress"] + [(ml["seconds"], ml["events"])]))
        axes[1].plot(t, n, marker=".")
        axes[1].axvline(300, color="k", ls="--", lw=1, label="target 300 s")
        axes[1].set_xlabel("seconds")
        axes[1].set_ylabel("events acknowledged (durable)")
        axes[1].set_title(f"MovieLens-1M over gRPC: {ml['events']:,} events in {ml['seconds']} s")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store-events", type=int, default=100_000)
    parser.add_argument("--single-events", type=int, default=2_000)
    parser.add_argument("--movielens-limit", type=int, default=0, help="0 = all 1,000,209")
    parser.add_argument("--no-movielens", action="store_true")
    parser.add_argument("--cluster-seconds", type=float, default=10.0,
                        help="timed ingest per cluster row")
    parser.add_argument("--cluster-only", action="store_true",
                        help="run only the cluster rows; replace them in ingest.json")
    parser.add_argument("--cluster-note", default="",
                        help="a note stored with the cluster rows (e.g. a busy machine)")
    parser.add_argument("--model-repo", default=os.environ.get("CROSSREC_MODEL_REPO",
                                                               str(REPO / "models")))
    args = parser.parse_args(argv)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                         capture_output=True, text=True).stdout.strip()
    if args.cluster_only:
        path = RESULTS / "ingest.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        with tempfile.TemporaryDirectory() as tmp:
            results["cluster"] = cluster_bench(Path(tmp) / "cluster", args.model_repo,
                                               args.cluster_seconds)
        results["cluster"].update(command=command, git_sha=sha, cpus=os.cpu_count(),
                                  note=args.cluster_note)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["cluster"]["ratios"]))
        print(f"wrote the cluster rows into {path}")
        return 0
    events = synthetic_stream(args.store_events + 3 * args.single_events)
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                         capture_output=True, text=True).stdout.strip(),
               "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
               "store": {}}
    with tempfile.TemporaryDirectory() as tmp:
        print("store: sqlite", flush=True)
        results["store"]["sqlite"] = store_bench(
            lambda: SQLiteProfileStore(Path(tmp) / "bench.sqlite3"), events, args.single_events)
        print(json.dumps(results["store"]["sqlite"]), flush=True)
        print("store: redis", flush=True)
        from services.fusion.redis_store import RedisProfileStore
        redis = RedisServer(Path(tmp) / "redis").start()
        try:
            results["store"]["redis"] = store_bench(lambda: RedisProfileStore(redis.url), events,
                                                    args.single_events)
        finally:
            redis.stop()
        print(json.dumps(results["store"]["redis"]), flush=True)
        sqlite = results["store"]["sqlite"]
        results["ratios"] = {
            "sqlite_batch_vs_single": round(sqlite["batch_1000"]["events_per_s"]
                                            / sqlite["single"]["events_per_s"], 1),
            "sqlite_group_commit_x16_vs_single": round(sqlite["single_x16"]["events_per_s"]
                                                       / sqlite["single"]["events_per_s"], 1)}
        results["targets"] = {"sqlite_batched_events_per_s": 20000,
                              "sqlite_batched_met": sqlite["batch_1000"]["events_per_s"] >= 20000}
        if not args.no_movielens:
            print("movielens-1m bulk ingest over gRPC", flush=True)
            results["movielens"] = movielens_bulk(Path(tmp) / "run", args.model_repo,
                                                  args.movielens_limit)
            print({k: v for k, v in results["movielens"].items() if k != "progress"})
        print("cluster rows through fusion", flush=True)
        results["cluster"] = cluster_bench(Path(tmp) / "cluster", args.model_repo,
                                           args.cluster_seconds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "ingest.png")
    print(f"wrote {RESULTS / 'ingest.json'} and ingest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
