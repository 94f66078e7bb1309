"""Bulk catalogue load benchmark: the CLI's `items load` of the real catalogue into a fresh
local stack (embedding, fusion, ranking on loopback), end to end, against the offline ceiling
of the same encoder on the same item texts measured in the same run. Writes
bench/results/catalogue_load.json.

    .venv/bin/python -m bench.catalogue_load [--models encoder,encoder_int8] [--items 0]

Per model: a fresh stack whose embedding service serves that model; `python -m tools.cli
items load` of the items CSV (--batch-size, --concurrency: the CLI's defaults); items/s from
the CLI's wall time, CPU seconds by process (/proc, the CLI by getrusage); then, with the
stack idle, the ceiling: Encoder.run_sorted over the first --ceiling-items item texts
(length-sorted model calls of 32, one thread per core), the most any plumbing could reach.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.ceiling import engine_ceiling
from bench.common import (MODEL_REPO, REPO, RESULTS, command_line, cpu_model, cpu_seconds,
                          utc_now, write_results)
from dataio import AMAZON, data_dir, read_items
from recmodel import modelrepo
from recmodel.text import compose_item_text
from tools.stack import python_env, start_stack

TARGET_ITEMS_PER_S = 1000


def ceiling(model_dir: Path, texts: list[str], seconds: float) -> dict:
    top = engine_ceiling(model_dir, texts, seconds)
    return {"items_per_s": top["texts_per_s"], "items": len(texts),
            "tokens_per_item": top["tokens_per_text"]}


def load_once(args, model: str, items_csv: Path, n_items: int, texts: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="crossrec-bench-load-"))
    procs = start_stack(run_dir, str(args.model_repo),
                        extra={"embedding": ["--model-name", model]})
    try:
        env = python_env({f"CROSSREC_{n.upper()}_ADDRESS": p.address for n, p in procs.items()})
        pids = {n: p.proc.pid for n, p in procs.items()}
        before = cpu_seconds(pids)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "tools.cli", "items", "load", str(items_csv), "--json",
             "--batch-size", str(args.batch_size), "--concurrency", str(args.concurrency)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        now = cpu_seconds(pids)
        cpu = {n: round(now[n] - before[n], 1) for n in pids}
        cpu["cli"] = round(after.ru_utime + after.ru_stime
                           - children.ru_utime - children.ru_stime, 1)
        if done.returncode != 0:
            raise RuntimeError(f"items load exited {done.returncode}: {done.stderr[-2000:]}")
        report = json.loads(done.stdout)
        print(f"{model}: {report['upserted']:,} items in {wall:.1f}s = "
              f"{report['upserted'] / wall:.0f}/s; CPU s {cpu}", flush=True)
    finally:
        codes = {n: p.stop() for n, p in reversed(list(procs.items()))}
        shutil.rmtree(run_dir, ignore_errors=True)
    top = ceiling(modelrepo.resolve(args.model_repo, model), texts[:args.ceiling_items],
                  args.ceiling_s)
    rate = report["upserted"] / wall
    print(f"{model}: offline ceiling {top['items_per_s']:.0f} items/s; load at "
          f"{rate / top['items_per_s']:.0%} of it", flush=True)
    return {"upserted": report["upserted"], "expected": n_items, "wall_s": round(wall, 1),
            "items_per_s": round(rate, 1), "cpu_s_by_process": cpu, "exit_codes": codes,
            "offline_ceiling": top, "vs_offline_ceiling": round(rate / top["items_per_s"], 3),
            "target_items_per_s": TARGET_ITEMS_PER_S,
            "met": rate >= TARGET_ITEMS_PER_S}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repo", type=Path, default=Path(MODEL_REPO))
    parser.add_argument("--models", default="encoder,encoder_int8",
                        help="embedding models to serve, one fresh stack each")
    parser.add_argument("--items", type=int, default=0, help="first N catalogue rows; 0: all")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--ceiling-items", type=int, default=4000)
    parser.add_argument("--ceiling-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "catalogue_load.json")
    args = parser.parse_args(argv)
    source = data_dir() / AMAZON / "items.csv"
    rows = read_items(AMAZON)
    tmp = Path(tempfile.mkdtemp(prefix="crossrec-bench-items-"))
    items_csv = source
    if args.items:
        rows = rows[:args.items]
        items_csv = tmp / "items.csv"
        with open(source, encoding="utf-8", newline="") as f, \
                open(items_csv, "w", encoding="utf-8", newline="") as out:
            reader, writer = csv.reader(f), csv.writer(out)
            writer.writerow(next(reader))
            for n, row in enumerate(reader):
                if n >= args.items:
                    break
                writer.writerow(row)
    texts = [compose_item_text(r["title"], r["attributes"]) for r in rows]
    started = time.perf_counter()
    runs = {m: load_once(args, m, items_csv, len(rows), texts) for m in args.models.split(",")}
    shutil.rmtree(tmp, ignore_errors=True)
    results = {"command": command_line(), "created_at": utc_now(),
               "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
               "items_csv": str(source), "items": len(rows),
               "params": {"batch_size": args.batch_size, "concurrency": args.concurrency,
                          "ceiling_items": args.ceiling_items},
               "runs": runs, "wall_s": round(time.perf_counter() - started, 1)}
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
