"""What the ranking service's worker processes cost: the catalogue coherence check before each
Recommend (Catalog.refresh with nothing new, and applying another process's 1-item upsert) and
the memory of each worker on the real 38,396-item catalogue. Writes
bench/results/workers.json.

    .venv/bin/python -m bench.workers [--calls 20000] [--processes 1,2]

The catalogue holds the real items with random unit vectors (memory and refresh cost do not
depend on the values); memory is read from /proc (VmRSS, and PSS, which splits shared pages
between the processes sharing them) once every worker is SERVING.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import MODEL_REPO, RESULTS, command_line, cpu_model, git_sha, write_results
from dataio import AMAZON, read_items
from recmodel.text import compose_item_text
from services.ranking.catalog import CatalogItem
from services.ranking.sqlite_catalog import SQLiteCatalog
from tools.stack import ServiceProcess, service_args, start_stack

DIM = 384


def write_catalogue(path: Path) -> int:
    rows = read_items(AMAZON)
    vectors = np.random.default_rng(0).normal(size=(len(rows), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    catalog = SQLiteCatalog(path, DIM, "exact")
    for start in range(0, len(rows), 5000):
        chunk = rows[start:start + 5000]
        catalog.upsert([CatalogItem(r["item_id"], r["platform"], r["title"], r["attributes"],
                                    compose_item_text(r["title"], r["attributes"]))
                        for r in chunk], vectors[start:start + 5000])
    catalog.close()
    return len(rows)


def refresh_costs(path: Path, calls: int) -> dict:
    """µs per refresh() with nothing new (three runs), and ms to apply another
    connection's 1-item upsert (20 of them), on the catalogue at `path`."""
    writer, reader = SQLiteCatalog(path, DIM, "exact"), SQLiteCatalog(path, DIM, "exact")
    try:
        reader.refresh()
        idle = []
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(calls):
                reader.refresh()
            idle.append(round((time.perf_counter() - started) / calls * 1e6, 2))
        applied = []
        vector = np.zeros((1, DIM), np.float32)
        vector[0, 0] = 1
        for n in range(20):
            writer.upsert([CatalogItem(f"bench-{n}", "office", "bench item", {}, "bench")],
                          vector)
            started = time.perf_counter()
            reader.refresh()
            applied.append((time.perf_counter() - started) * 1000)
        return {"idle_us_per_call": idle, "apply_1_item_ms_p50": round(
            float(np.percentile(applied, 50)), 2), "apply_1_item_ms_max": round(max(applied), 2),
            "items": reader.size("office") + reader.size("arts_crafts")}
    finally:
        writer.close()
        reader.close()


def memory_mib(pid: int) -> dict:
    out = {}
    for name, keys in (("status", ("VmRSS",)), ("smaps_rollup", ("Pss",))):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key = line.split(":")[0]
            if key in keys:
                out[key.lower() + "_mib"] = int(line.split()[1]) // 1024
    return out


def worker_memory(run_dir: Path, catalogue: Path, model_repo: str, counts) -> list[dict]:
    procs = start_stack(run_dir, model_repo, names=("embedding", "fusion"))
    out = []
    try:
        for n in counts:
            args = service_args("ranking", model_repo, run_dir / f"ranking-{n}",
                                {k: p.address for k, p in procs.items()})
            ranking = ServiceProcess("ranking", args + ["--processes", str(n), "--catalog-path",
                                                        str(catalogue)],
                                     run_dir / f"ranking-{n}").start().wait_ready(300)
            try:
                time.sleep(2)
                pid = ranking.proc.pid
                kids = [int(c) for c in
                        Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
                row = {"processes": n, "parent": memory_mib(pid),
                       "workers": [memory_mib(k) for k in kids]}
            finally:
                row["exit_code"] = ranking.stop()
            print(f"  --processes {n}: {row}", flush=True)
            out.append(row)
    finally:
        for p in reversed(list(procs.values())):
            p.stop()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--processes", default="1,2")
    p.add_argument("--model-repo", default=MODEL_REPO)
    p.add_argument("--out", default=str(RESULTS / "workers.json"))
    args = p.parse_args(argv)
    results = {"command": command_line(), "git_sha": git_sha(), "cpus": os.cpu_count(),
               "cpu": cpu_model()}
    with tempfile.TemporaryDirectory() as tmp:
        small, full = Path(tmp) / "small.sqlite3", Path(tmp) / "catalog.sqlite3"
        catalog = SQLiteCatalog(small, DIM, "exact")
        vectors = np.eye(DIM, dtype=np.float32)[np.arange(1000) % DIM]
        catalog.upsert([CatalogItem(f"i{n}", "office", "item", {}, "item")
                        for n in range(1000)], vectors)
        catalog.close()
        results["refresh_1000_items"] = refresh_costs(small, args.calls)
        print(f"  refresh, 1,000 items: {results['refresh_1000_items']}", flush=True)
        results["items"] = write_catalogue(full)
        results["refresh_full_catalogue"] = refresh_costs(full, args.calls)
        print(f"  refresh, {results['items']:,} items: {results['refresh_full_catalogue']}",
              flush=True)
        results["memory"] = worker_memory(Path(tmp), full, args.model_repo,
                                          [int(x) for x in args.processes.split(",")])
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
