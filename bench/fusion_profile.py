"""GetProfile benchmark: fusion's CPU per GetProfile as ranking asks it (for one platform,
50 recent events, no item vectors), one caller, with the user-vector cache on and off in the
same run. Writes bench/results/fusion_profile.json.

    .venv/bin/python -m bench.fusion_profile [--users 300] [--seconds 10]

One embedding service and two fusion services (cache on: the default; off:
--user-vector-cache-items 0) on loopback; the first --users real users' events are ingested
into both; then the same requests (every user on each platform, in turn) go to each fusion for
--seconds, the two taking turns every 500 calls, after one unmeasured pass that fills the
cache. CPU per call from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import (MODEL_REPO, RESULTS, command_line, cpu_model, cpu_seconds, utc_now,
                          write_results)
from crossrec.common.v1 import common_pb2
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from dataio import AMAZON, user_events
from tools.stack import ServiceProcess, service_args, start_stack

CONFIGS = {"cache_on": [], "cache_off": ["--user-vector-cache-items", "0"]}
TURN = 500


def start_fusions(run: Path, model_repo: str, procs: dict[str, ServiceProcess]) -> None:
    """One fusion per CONFIGS entry on the embedding service in `procs`, added to it."""
    for name, flags in CONFIGS.items():
        folder = run / name
        folder.mkdir()
        fusion_args = service_args("fusion", model_repo, folder,
                                   {"embedding": procs["embedding"].address})
        procs[name] = ServiceProcess("fusion", fusion_args + flags, folder).start()
        procs[name].wait_ready()


def take_turns(stubs: dict, requests: list, pids: dict[str, int], seconds: float) -> tuple:
    """The requests to each fusion TURN calls at a time, in turn, until each has spent
    `seconds`; (calls, fusion CPU seconds, wall seconds) by config."""
    calls, spent = dict.fromkeys(CONFIGS, 0), dict.fromkeys(CONFIGS, 0.0)
    wall = dict.fromkeys(CONFIGS, 0.0)
    while min(spent.values()) < seconds:
        for name, stub in stubs.items():
            before, started = cpu_seconds({name: pids[name]})[name], time.perf_counter()
            for n in range(TURN):
                stub.GetProfile(requests[(calls[name] + n) % len(requests)], timeout=10)
            wall[name] += time.perf_counter() - started
            spent[name] += cpu_seconds({name: pids[name]})[name] - before
            calls[name] += TURN
    return calls, spent, wall


def measure(args: argparse.Namespace, procs: dict[str, ServiceProcess]) -> tuple:
    """The users ingested into both fusions, one unmeasured pass, then the turns;
    (requests, calls, CPU seconds, wall seconds)."""
    users = user_events(AMAZON, users=args.users)
    stubs, channels = {}, []
    for name in CONFIGS:
        channel = grpc.insecure_channel(procs[name].address)
        channels.append(channel)
        stubs[name] = fusion_pb2_grpc.FusionServiceStub(channel)
        for events in users.values():
            stubs[name].Ingest(fusion_pb2.IngestRequest(events=[
                common_pb2.BehaviorEvent(**{k: v for k, v in e.items() if v is not None})
                for e in events]), timeout=60)
    requests = [fusion_pb2.GetProfileRequest(user_id=u, for_platform=platform,
                                             recent_events_limit=50, omit_item_vectors=True)
                for u in users for platform in ("office", "arts_crafts")]
    for stub in stubs.values():  # one pass: the cache filled, the model warm
        for request in requests:
            stub.GetProfile(request, timeout=10)
    pids = {name: procs[name].proc.pid for name in CONFIGS}
    calls, spent, wall = take_turns(stubs, requests, pids, args.seconds)
    for channel in channels:
        channel.close()
    return requests, calls, spent, wall


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per config")
    p.add_argument("--model-repo", default=MODEL_REPO)
    p.add_argument("--out", type=Path, default=RESULTS / "fusion_profile.json")
    args = p.parse_args(argv)
    run = Path(tempfile.mkdtemp(prefix="crossrec-bench-fusion-"))
    procs = start_stack(run, args.model_repo, names=("embedding",))
    try:
        start_fusions(run, args.model_repo, procs)
        requests, calls, spent, wall = measure(args, procs)
    finally:
        codes = {name: proc.stop() for name, proc in reversed(list(procs.items()))}
    results = {
        "command": command_line(), "created_at": utc_now(),
        "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
        "params": {"users": args.users, "profiles": len(requests), "recent_events_limit": 50,
                   "omit_item_vectors": True, "callers": 1},
        "configs": {name: {"flags": CONFIGS[name], "calls": calls[name],
                           "fusion_cpu_ms_per_call": round(spent[name] / calls[name] * 1000, 3),
                           "wall_ms_per_call": round(wall[name] / calls[name] * 1000, 3)}
                    for name in CONFIGS},
        "exit_codes": codes}
    results["cpu_ratio_on_vs_off"] = round(
        results["configs"]["cache_on"]["fusion_cpu_ms_per_call"]
        / results["configs"]["cache_off"]["fusion_cpu_ms_per_call"], 3)
    print(json.dumps(results["configs"], indent=2), f"\non/off {results['cpu_ratio_on_vs_off']}")
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
