"""Ranking at ten times its admission limit: how fast refusals (RESOURCE_EXHAUSTED) come back
and whether answered calls keep their latency, for each --max-concurrent-rpcs given (the
gRPC server's own cap, which refuses before any handler, thread or deserialisation) in the
same run. All services and the load on this machine's cores, loopback only.

    .venv/bin/python -m bench.overload [--processes 1] [--callers 360] [--flood-s 8]
        [--max-concurrent-rpcs 64,512] [--out bench/results/overload.json]

The admission limit is --max-active-recommends + --max-waiting-recommends per worker process
(4 + 32 by default); --callers (default 10 x 36 x processes) closed-loop callers over
--connections connections flood it after a baseline at --baseline-callers; then an open loop
offers --open-loop-factor times the baseline's answered rate (calls sent on schedule, as a
fleet of independent clients would: a closed loop's refused callers re-send at once, so its
refusal latency is bounded below by callers / refusal rate, Little's law). Data as
bench/e2e.py: the real catalogue from the encoder's cached vectors, real users.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import (MODEL_REPO, RESULTS, command_line, cpu_model, git_sha, percentiles,
                          write_results)
from bench.stack_data import load_data, seed_stores
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from tools.stack import ServiceProcess, service_args, start_stack

DEADLINE_S = 5.0


def _channels(address: str, connections: int) -> list:
    """`connections` channels of their own (not one shared connection) to `address`."""
    return [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections)]


async def _recommend(stub, users: list[str], n: int) -> str:
    """The n-th user's Recommend (platforms alternate): its status name."""
    try:
        await stub.Recommend(ranking_pb2.RecommendRequest(
            user_id=users[n % len(users)], platform=("office", "arts_crafts")[n % 2], k=10,
            exclude_seen=True), timeout=DEADLINE_S)
        return "OK"
    except grpc.aio.AioRpcError as err:
        return err.code().name


async def closed_loop(address: str, users: list[str], callers: int, connections: int,
                      seconds: float) -> dict[str, list[float]]:
    """`callers` closed-loop Recommend callers round robin over `connections` connections
    for `seconds`: {status name: [seconds of each call]}."""
    channels = _channels(address, connections)
    stubs = [ranking_pb2_grpc.RankingServiceStub(c) for c in channels]
    out: dict[str, list[float]] = {}
    stop_at = time.monotonic() + seconds

    async def caller(i: int):
        n = i
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            code = await _recommend(stubs[i % connections], users, n)
            out.setdefault(code, []).append(time.perf_counter() - started)
            n += callers
            await asyncio.sleep(0)
    await asyncio.gather(*(caller(i) for i in range(callers)))
    for c in channels:
        await c.close()
    return out


async def open_loop(address: str, users: list[str], rate: float, connections: int,
                    seconds: float) -> dict[str, list[float]]:
    """Recommend calls sent at `rate` per second for `seconds` whatever the answers (each
    call's time counted from when it was due, so a late send counts against it), round robin
    over `connections` connections: {status name: [seconds of each call]}."""
    channels = _channels(address, connections)
    stubs = [ranking_pb2_grpc.RankingServiceStub(c) for c in channels]
    out: dict[str, list[float]] = {}

    async def call(n: int, due: float):
        code = await _recommend(stubs[n % connections], users, n)
        out.setdefault(code, []).append(time.perf_counter() - due)

    start, tasks = time.perf_counter(), []
    for n in range(int(rate * seconds)):
        due = start + n / rate
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.ensure_future(call(n, due)))
    await asyncio.gather(*tasks)
    for c in channels:
        await c.close()
    return out


def summary(calls: dict[str, list[float]], seconds: float) -> dict:
    ok, refused = calls.get("OK", []), calls.get("RESOURCE_EXHAUSTED", [])
    out = {"counts": {k: len(v) for k, v in calls.items()},
           "ok_rps": round(len(ok) / seconds, 1)}
    for name, values in (("ok", ok), ("refused", refused)):
        pct = (percentiles(values, scale=1000, digits=2, qs=(50, 99)) if values
               else dict.fromkeys(("p50_ms", "p99_ms")))
        out.update({f"{name}_{k}": v for k, v in pct.items()})
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--max-concurrent-rpcs", default="64,512")
    p.add_argument("--callers", type=int, default=0, help="0: 10 x the admission limit")
    p.add_argument("--baseline-callers", type=int, default=0,
                   help="0: the admission limit (the latency answered calls should keep)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--baseline-s", type=float, default=4)
    p.add_argument("--flood-s", type=float, default=8)
    p.add_argument("--open-loop-factor", type=float, default=10,
                   help="then an open-loop flood at this many times the baseline's answered "
                        "rate (calls sent on schedule whatever the answers); 0 = skip")
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--model-repo", default=MODEL_REPO)
    p.add_argument("--out", default=str(RESULTS / "overload.json"))
    return p.parse_args(argv)


def flood_one_cap(args: argparse.Namespace, run_dir: Path, procs: dict, cap: int,
                  callers: int, users: list[str] | None) -> tuple[dict, list[str]]:
    """A ranking with --max-concurrent-rpcs `cap`: the baseline, the closed-loop flood, the
    open-loop flood; (the run's figures, the users, loaded through it when None)."""
    ranking = ServiceProcess("ranking", service_args(
        "ranking", args.model_repo, run_dir,
        {n: q.address for n, q in procs.items()}) + [
        "--processes", str(args.processes), "--max-concurrent-rpcs", str(cap)],
        run_dir / f"ranking-{cap}").start().wait_ready(300)
    try:
        if users is None:
            users = load_data({**procs, "ranking": ranking}, args.users, 0, False).users
        base = asyncio.run(closed_loop(ranking.address, users, args.baseline_callers,
                                       args.connections, args.baseline_s))
        flood = asyncio.run(closed_loop(ranking.address, users, callers, args.connections,
                                        args.flood_s))
        capacity = len(base.get("OK", [])) / args.baseline_s
        offered = args.open_loop_factor * capacity
        opened = (asyncio.run(open_loop(ranking.address, users, offered, args.connections,
                                        args.flood_s))
                  if args.open_loop_factor else {})
    finally:
        code = ranking.stop()
    run = {"max_concurrent_rpcs": cap, "exit_code": code,
           "baseline": summary(base, args.baseline_s), "flood": summary(flood, args.flood_s)}
    if opened:
        run["open_loop"] = {"offered_rps": round(offered, 1),
                            "factor_of_capacity": args.open_loop_factor,
                            **summary(opened, args.flood_s)}
    return run, users


def main(argv=None) -> int:
    args = parse_args(argv)
    limit = (4 + 32) * args.processes
    callers = args.callers or 10 * limit
    args.baseline_callers = args.baseline_callers or limit
    results = {"command": command_line(), "git_sha": git_sha(), "cpus": os.cpu_count(),
               "cpu": cpu_model(),
               "params": {"processes": args.processes, "admission_limit": limit,
                          "callers": callers, "connections": args.connections,
                          "baseline_callers": args.baseline_callers,
                          "deadline_s": DEADLINE_S}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        seed_stores(run_dir, args.model_repo, 0)
        procs = start_stack(run_dir, args.model_repo, names=("embedding", "fusion"))
        try:
            users = None
            for cap in [int(x) for x in args.max_concurrent_rpcs.split(",")]:
                run, users = flood_one_cap(args, run_dir, procs, cap, callers, users)
                print(json.dumps(run), flush=True)
                results["runs"].append(run)
        finally:
            for q in reversed(list(procs.values())):
                q.stop()
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
