"""Tracing overhead: the real stack on loopback three times at once, tracing off, on (every
trace sampled) and on at a 10% sampling ratio, each exporting to a local OTLP collector
(tools/trace_collector.py); sequential Recommends through the client library in blocks
of --block calls, the modes taking turns block by block (the first mode rotating), so that
other load on the shared machine falls on all of them alike. Records each service process's
CPU time per Recommend over the whole measured phase (Linux /proc; the exporter's background
work included) and latency by mode, and the ratios to tracing off. Writes
bench/results/tracing.json. About 2.5 minutes.

    .venv/bin/python -m bench.tracing [--users 200] [--calls 1500] [--block 10]

Data: the whole Amazon Arts/Office catalogue, written from the encoder's cached vectors as
bench/e2e.py does, and the first --users users' history events through fusion's Ingest.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (MODEL_REPO, RESULTS, command_line, cpu_seconds, git_dirty, git_sha,
                          machine, percentiles, write_results)
from bench.stack_data import seed_stores
from clients.crossrec_client import CrossrecClient, CrossrecError, Event
from dataio import AMAZON, user_events
from tools.stack import start_stack
from tools.trace_collector import TraceCollector

# name: sampling ratio (None: tracing off)
MODES = {"off": None, "on": 1.0, "on_ratio_0.1": 0.1}
SERVICES = ("embedding", "fusion", "ranking")
MIN_CPU_MS_FOR_RATIO = 0.1
# The SDK's batch span processor exports every 5 s (OTEL_BSP_SCHEDULE_DELAY).
EXPORT_EVERY_S = 6.0


def start(mode: str, ratio: float | None, run_dir: Path, model_repo: str, n_users: int):
    """(stack, collector or None, client, users) for one mode, data loaded."""
    run_dir.mkdir()
    seed_stores(run_dir, model_repo, 0)
    collector = TraceCollector().start() if ratio is not None else None
    flags = ([] if collector is None else
             ["--otlp-endpoint", collector.endpoint, "--trace-sample-ratio", str(ratio)])
    procs = start_stack(run_dir, model_repo, extra={name: flags for name in SERVICES})
    client = CrossrecClient(fusion=procs["fusion"].address, ranking=procs["ranking"].address,
                            timeout_s=60)
    users = user_events(AMAZON, users=n_users)
    try:
        client.fusion.ingest_stream((Event.of(e) for es in users.values() for e in es),
                                    timeout=600)
    except BaseException:
        client.close()
        for proc in reversed(list(procs.values())):
            proc.stop()
        raise
    print(f"  {mode}: stack up, {len(users)} users ingested", flush=True)
    return procs, collector, client, list(users)


def run_calls(client, users: list[str], calls: int, offset: int) -> tuple[list, int]:
    """`calls` sequential Recommends (k=10, exclude_seen) of users in turn, alternating the
    platform; (latencies in s, errors)."""
    latencies, errors = [], 0
    for n in range(calls):
        user = users[(offset + n) % len(users)]
        platform = ("office", "arts_crafts")[n % 2]
        started = time.perf_counter()
        try:
            client.ranking.recommend(user, platform, k=10, exclude_seen=True)
        except CrossrecError:
            errors += 1
        latencies.append(time.perf_counter() - started)
    return latencies, errors


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--calls", type=int, default=1500, help="measured Recommends per mode")
    p.add_argument("--block", type=int, default=10, help="Recommends per mode per turn")
    p.add_argument("--warmup", type=int, default=50, help="Recommends per mode first, unmeasured")
    p.add_argument("--model-repo", default=MODEL_REPO)
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """The three stacks, the alternating Recommends, the figures (bench/e2e.py runs this too,
    so its results hold the tracing ratio of the same run)."""
    began = time.perf_counter()
    results = {"command": command_line(), "git_sha": git_sha(), "git_dirty": git_dirty(),
               **machine(), "provider": "CPUExecutionProvider",
               "params": {"users": args.users, "calls": args.calls,
                          "block": args.block, "warmup": args.warmup, "k": 10,
                          "exclude_seen": True, "callers": 1, "modes": MODES,
                          "catalogue": "all 38,396 items (encoder cache)"}}
    stacks = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("starting three stacks (tracing off, on, on at 10%)", flush=True)
        try:
            for mode, ratio in MODES.items():
                stacks[mode] = start(mode, ratio, Path(tmp) / mode, args.model_repo,
                                     args.users)
            measured = take_turns(args, stacks)
        finally:
            # Stopping flushes every span a server still holds into its collector.
            for mode, (procs, _, client, _) in stacks.items():
                client.close()
                results.setdefault("exit_codes", {})[mode] = {
                    n: p.stop() for n, p in reversed(list(procs.items()))}
            for _, collector, _, _ in stacks.values():
                if collector is not None:
                    collector.stop()
    # The popularity refreshes' spans (GetItemStats) count too: a few per stack in the run.
    spans = {m: len(c.spans) - measured["spans_before"][m]
             for m, (_, c, _, _) in stacks.items() if c}
    results["modes"] = modes = by_mode(measured, spans)
    off = modes["off"]["cpu_ms_per_recommend"]
    # Embedding does no work in a plain Recommend: its few ticks are no base for a ratio.
    results["ratio_to_off"] = {
        mode: {"cpu": {s: round(modes[mode]["cpu_ms_per_recommend"][s] / off[s], 3)
                       for s in (*SERVICES, "all") if off[s] >= MIN_CPU_MS_FOR_RATIO},
               "p50": round(modes[mode]["p50_ms"] / modes["off"]["p50_ms"], 3)}
        for mode in MODES if mode != "off"}
    results["wall_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps({"modes": modes, "ratio_to_off": results["ratio_to_off"]}, indent=2))
    return results


def take_turns(args: argparse.Namespace, stacks: dict) -> dict:
    """The warm-up, then args.calls Recommends per mode in blocks, the modes taking turns;
    latencies, errors and CPU seconds by mode, the spans received before measuring, and the
    calls measured per mode."""
    time.sleep(11)  # one popularity refresh in each ranking
    for _, _, client, users in stacks.values():
        run_calls(client, users, args.warmup, 0)
    time.sleep(EXPORT_EVERY_S)  # the warm-up's spans exported before measuring
    spans_before = {m: len(c.spans) for m, (_, c, _, _) in stacks.items() if c}
    pids = {m: {s: procs[s].proc.pid for s in SERVICES}
            for m, (procs, _, _, _) in stacks.items()}
    latencies = {m: [] for m in MODES}
    errors = dict.fromkeys(MODES, 0)
    turns = list(stacks.items())
    blocks = args.calls // args.block
    before = {m: cpu_seconds(pids[m]) for m in MODES}
    for b in range(blocks):
        for i in range(len(turns)):
            mode, (_, _, client, users) = turns[(b + i) % len(turns)]
            lat, err = run_calls(client, users, args.block, b * args.block)
            latencies[mode] += lat
            errors[mode] += err
        if (b + 1) % max(1, blocks // 5) == 0:
            print(f"  {b + 1}/{blocks} blocks", flush=True)
    time.sleep(EXPORT_EVERY_S)  # the last spans' export is part of the cost
    after = {m: cpu_seconds(pids[m]) for m in MODES}
    cpu = {m: {s: after[m].get(s, 0.0) - before[m].get(s, 0.0) for s in SERVICES}
           for m in MODES}
    return {"latencies": latencies, "errors": errors, "cpu": cpu,
            "spans_before": spans_before, "calls": blocks * args.block}


def by_mode(measured: dict, spans: dict[str, int]) -> dict:
    """Per mode: calls, errors, latency percentiles, CPU per Recommend by service, spans."""
    n = measured["calls"]
    modes = {}
    for mode in MODES:
        per_call = {s: round(measured["cpu"][mode][s] * 1000 / n, 3) for s in SERVICES}
        modes[mode] = {"calls": n, "errors": measured["errors"][mode],
                       **percentiles(measured["latencies"][mode], scale=1000, digits=2),
                       "cpu_ms_per_recommend": {**per_call,
                                                "all": round(sum(per_call.values()), 3)}}
        if mode in spans:
            modes[mode]["spans_received_per_recommend"] = round(spans[mode] / n, 2)
    return modes


def main(argv=None) -> int:
    write_results(RESULTS / "tracing.json", measure(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
