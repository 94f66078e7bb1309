"""Ingest benchmark: durable events/s of the profile store backends, single-event vs batched,
then the whole of MovieLens-1M through the running embedding + fusion services over gRPC.
Writes bench/results/ingest.{json,png}.

    .venv/bin/python bench/ingest.py [--store-events 100000] [--movielens-limit 0]

Store part (in-process, real events, both backends on this machine, fixed seed): every append
returns only once its events are durable (SQLite WAL + synchronous=FULL; Redis AOF with
appendfsync always). "single" = one event per call from one caller; "single x16" = one event
per call from 16 concurrent callers (group commit merges them); "batch" = 1,000 events per call.

MovieLens part: `python -m services.embedding.server` and `python -m services.fusion.server`
(SQLite) on 127.0.0.1; 4 concurrent client streams (IngestStream, 1,000 events per message,
users split by hash) send all 1,000,209 ratings; item titles are embedded by the fusion
service through the embedding service, each once. Progress is printed every 5 s.
"""

from __future__ import annotations

import argparse
import gzip
import csv
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "gen"), str(REPO)]

from clients.datasets import AMAZON, MOVIELENS, data_dir, item_texts, to_event, user_events  # noqa: E402
from clients.crossrec_client import FusionClient  # noqa: E402
from clients.stack import RedisServer, start_stack  # noqa: E402
from services.common.events import validate_event  # noqa: E402
from services.fusion.store import SQLiteStore  # noqa: E402

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
    with gzip.open(data_dir() / MOVIELENS / "events.csv.gz", "rt", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if limit and i >= limit:
                return
            yield row


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store-events", type=int, default=100_000)
    parser.add_argument("--single-events", type=int, default=2_000)
    parser.add_argument("--movielens-limit", type=int, default=0, help="0 = all 1,000,209")
    parser.add_argument("--no-movielens", action="store_true")
    parser.add_argument("--model-repo", default=os.environ.get("CROSSREC_MODEL_REPO",
                                                               str(REPO / "models")))
    args = parser.parse_args(argv)
    events = synthetic_stream(args.store_events + 3 * args.single_events)
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                         capture_output=True, text=True).stdout.strip(),
               "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
               "store": {}}
    with tempfile.TemporaryDirectory() as tmp:
        print("store: sqlite", flush=True)
        results["store"]["sqlite"] = store_bench(
            lambda: SQLiteStore(Path(tmp) / "bench.sqlite3"), events, args.single_events)
        print(json.dumps(results["store"]["sqlite"]), flush=True)
        print("store: redis", flush=True)
        from services.fusion.redis_store import RedisStore
        redis = RedisServer(Path(tmp) / "redis").start()
        try:
            results["store"]["redis"] = store_bench(lambda: RedisStore(redis.url), events,
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "ingest.png")
    print(f"wrote {RESULTS / 'ingest.json'} and ingest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
