"""Ingest benchmark: durable events/s of the profile store backends, single-event vs batched,
then the whole of MovieLens-1M through the running embedding + fusion services over gRPC.
Writes bench/results/ingest.{json,png}.

    .venv/bin/python -m bench.ingest [--store-events 100000] [--movielens-limit 0]
    .venv/bin/python -m bench.ingest --cluster-only [--cluster-seconds 10]

Store part (in-process, real events, both backends on this machine, fixed seed): every append
returns only once its events are durable (SQLite WAL + synchronous=FULL; Redis AOF with
appendfsync always). "single" = one event per call from one caller; "single x16" = one event
per call from 16 concurrent callers (group commit merges them); "batch" = 1,000 events per call.

MovieLens part: `python -m services.embedding.server` and `python -m services.fusion.server`
(SQLite) on 127.0.0.1; 4 concurrent client streams (IngestStream, 1,000 events per message,
users split by hash) send all 1,000,209 ratings; item titles are embedded by the fusion
service through the embedding service, each once. Progress is printed every 5 s.

Cluster part (bench/ingest_cluster.py; `cluster` in the results; `--cluster-only` runs it alone
and replaces that key in an existing ingest.json): one embedding service, then per row a fresh
Redis and a fusion service on it (`--store redis`): one primary (redis://), the same as a
1-node cluster, 3 primaries, 3 primaries + 3 replicas, and that with `--redis-replica-acks 1`.
Each row warms the store's item vectors (200 real items, embedded once), then 4 callers send
Ingest batches of 500 fresh events (2,000 users) for `--cluster-seconds`; durable events/s, and
the CPU seconds of each process kind (fusion, redis, embedding, this client) over the timed
window. Then, in process on 3 primaries + 3 replicas, the latency of one-event appends with and
without replica acks (what WAIT adds to one acknowledgement).
Everything shares the machine's cores, so the ratios between rows and the CPU split are the
result, not the absolute rates.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import MODEL_REPO, RESULTS, command_line, cpu_model, git_sha, write_results
from bench.ingest_cluster import cluster_bench
from bench.stack_data import synthetic_stream
from clients.crossrec_client import FusionClient
from dataio import MOVIELENS, item_texts, iter_events, to_event
from services.fusion.sqlite_store import SQLiteProfileStore
from tools.redis_server import RedisServer
from tools.stack import start_stack


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


def parse_args(argv=None) -> argparse.Namespace:
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
    parser.add_argument("--model-repo", default=MODEL_REPO)
    return parser.parse_args(argv)


def cluster_only(args: argparse.Namespace) -> int:
    """The cluster rows alone, replacing `cluster` in an existing ingest.json."""
    path = RESULTS / "ingest.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        results["cluster"] = cluster_bench(Path(tmp) / "cluster", args.model_repo,
                                           args.cluster_seconds)
    results["cluster"].update(command=command_line(), git_sha=git_sha(), cpus=os.cpu_count(),
                              note=args.cluster_note)
    write_results(path, results)
    print(json.dumps(results["cluster"]["ratios"]))
    return 0


def store_part(tmp: Path, events: list, single_events: int) -> dict:
    """Both backends' durable appends (store_bench) and SQLite's ratios and target."""
    results = {"store": {}}
    print("store: sqlite", flush=True)
    results["store"]["sqlite"] = store_bench(
        lambda: SQLiteProfileStore(tmp / "bench.sqlite3"), events, single_events)
    print(json.dumps(results["store"]["sqlite"]), flush=True)
    print("store: redis", flush=True)
    from services.fusion.redis_store import RedisProfileStore
    redis = RedisServer(tmp / "redis").start()
    try:
        results["store"]["redis"] = store_bench(lambda: RedisProfileStore(redis.url), events,
                                                single_events)
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
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cluster_only:
        return cluster_only(args)
    events = synthetic_stream(args.store_events + 3 * args.single_events)
    results = {"command": command_line(), "git_sha": git_sha(), "cpus": os.cpu_count(),
               "cpu": cpu_model()}
    with tempfile.TemporaryDirectory() as tmp:
        results.update(store_part(Path(tmp), events, args.single_events))
        if not args.no_movielens:
            print("movielens-1m bulk ingest over gRPC", flush=True)
            results["movielens"] = movielens_bulk(Path(tmp) / "run", args.model_repo,
                                                  args.movielens_limit)
            print({k: v for k, v in results["movielens"].items() if k != "progress"})
        print("cluster rows through fusion", flush=True)
        results["cluster"] = cluster_bench(Path(tmp) / "cluster", args.model_repo,
                                           args.cluster_seconds)
    write_results(RESULTS / "ingest.json", results)
    plot(results, RESULTS / "ingest.png")
    print(f"wrote {RESULTS / 'ingest.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
