"""Bounded loopback load test for crossrec (and for a bare echo server, as a ceiling).

    python -m tools.loadtest --ranking 127.0.0.1:50053 --fusion 127.0.0.1:50052 \\
        --mode closed --concurrency 32 --duration-s 30 --max-requests 200000 \\
        --mix recommend=0.8,ingest=0.1,profile=0.1 [--json out.json]
    python -m tools.loadtest ... --mode open --rate 300        # target requests/s

Closed loop: N callers, each sends its next request when the last one answered. Open loop:
requests start at the target rate whatever the latency (in flight capped by --max-in-flight;
a start that finds the cap full is counted as `client_overflow`, never queued without bound).
Traffic uses real users and items from ../shared/data; targets must be loopback addresses
(127.0.0.0/8, ::1, localhost): anything else is refused. The run stops by itself at
--duration-s or --max-requests, whichever comes first; the first --warmup-s are not counted.
Latency percentiles cover every call, refusals included; when some calls failed, ok_p50/95/99
cover the answered calls alone.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import grpc
import numpy as np

from crossrec.common.v1 import common_pb2
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc

ECHO_METHOD = "/crossrec.bench.Echo/Echo"


def check_loopback(address: str) -> None:
    """Raise ValueError unless `address` (host:port) is a loopback address."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing to load-test {address}: only loopback targets "
                     "(127.0.0.0/8, ::1, localhost) are allowed")


@dataclass
class Workload:
    """Real users and events to draw requests from."""
    users: list[str]
    events: list[dict]
    platforms: list[str]

    @classmethod
    def from_data(cls, n_users: int = 500, seed: int = 0) -> "Workload":
        from dataio import AMAZON, user_events
        by_user = user_events(AMAZON, users=n_users)
        events = [e for es in by_user.values() for e in es]
        random.Random(seed).shuffle(events)
        return cls(list(by_user), events, sorted({e["platform"] for e in events}))


class Runner:
    def __init__(self, args, workload: Workload):
        self.args = args
        self.workload = workload
        self.rng = random.Random(args.seed)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.ok_latency: dict[str, list[float]] = defaultdict(list)
        self.codes: dict[str, Counter] = defaultdict(Counter)
        self.sent = 0
        self.counting_from = 0.0
        self.overflow = 0
        mix = dict(part.split("=") for part in args.mix.split(","))
        self.kinds = list(mix)
        self.weights = [float(w) for w in mix.values()]
        self.channels = {}
        for kind in self.kinds:
            address = {"recommend": args.ranking, "ingest": args.fusion, "profile": args.fusion,
                       "echo": args.echo}[kind]
            if not address:
                raise ValueError(f"the mix has {kind} but its service address is not given")
            check_loopback(address)
            # Connections, not calls, are spread over a server's worker processes
            # (SO_REUSEPORT): several channels, each with a connection of its own (gRPC
            # shares one between channels to a target unless each has a local pool).
            self.channels.setdefault(address, [grpc.aio.insecure_channel(
                address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(args.connections)])
        self.ranking = [ranking_pb2_grpc.RankingServiceStub(c)
                        for c in self.channels.get(args.ranking, [])]
        self.fusion = [fusion_pb2_grpc.FusionServiceStub(c)
                       for c in self.channels.get(args.fusion, [])]
        self.echo = [c.unary_unary(ECHO_METHOD) for c in self.channels.get(args.echo, [])]
        self.payload = b"x" * args.echo_bytes

    def _call(self, kind: str):
        w, rng, timeout = self.workload, self.rng, self.args.timeout_s
        n = self.sent % self.args.connections  # round robin over the connections
        if kind == "recommend":
            return self.ranking[n].Recommend(ranking_pb2.RecommendRequest(
                user_id=rng.choice(w.users), platform=rng.choice(w.platforms), k=10,
                exclude_seen=True), timeout=timeout)
        if kind == "profile":
            return self.fusion[n].GetProfile(fusion_pb2.GetProfileRequest(
                user_id=rng.choice(w.users), for_platform=rng.choice(w.platforms)),
                timeout=timeout)
        if kind == "ingest":
            e = dict(rng.choice(w.events))
            e["event_id"] = f"lt-{time.time_ns()}-{rng.random()}"
            return self.fusion[n].Ingest(fusion_pb2.IngestRequest(events=[common_pb2.BehaviorEvent(
                **{k: v for k, v in e.items() if v is not None})]), timeout=timeout)
        return self.echo[n](self.payload, timeout=timeout)

    async def one(self) -> None:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        self.sent += 1
        started = time.perf_counter()
        try:
            await self._call(kind)
            code = "OK"
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        if started >= self.counting_from:
            ms = (time.perf_counter() - started) * 1000
            self.latency[kind].append(ms)
            if code == "OK":
                self.ok_latency[kind].append(ms)
            self.codes[kind][code] += 1

    async def run(self) -> dict:
        a = self.args
        began = time.perf_counter()
        self.counting_from = began + a.warmup_s
        end = began + a.warmup_s + a.duration_s

        def more() -> bool:
            return time.perf_counter() < end and self.sent < a.max_requests

        if a.mode == "closed":
            async def caller():
                while more():
                    await self.one()
            await asyncio.gather(*(caller() for _ in range(a.concurrency)))
        else:
            in_flight: set[asyncio.Task] = set()
            interval = 1.0 / a.rate
            next_at = time.perf_counter()
            while more():
                if len(in_flight) >= a.max_in_flight:
                    self.overflow += 1
                else:
                    task = asyncio.ensure_future(self.one())
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if in_flight:
                await asyncio.wait(in_flight, timeout=a.timeout_s + 1)
        measured = time.perf_counter() - self.counting_from
        for channels in self.channels.values():
            for channel in channels:
                await channel.close()
        return self.report(measured)

    def report(self, seconds: float) -> dict:
        per_rpc = {}
        for kind, lat in self.latency.items():
            arr = np.asarray(lat)
            per_rpc[kind] = {
                "requests": len(lat), "throughput_rps": round(len(lat) / seconds, 1),
                "p50_ms": round(float(np.percentile(arr, 50)), 2),
                "p95_ms": round(float(np.percentile(arr, 95)), 2),
                "p99_ms": round(float(np.percentile(arr, 99)), 2),
                "max_ms": round(float(arr.max()), 2), "codes": dict(self.codes[kind])}
            ok = np.asarray(self.ok_latency[kind])
            if len(ok) and len(ok) < len(arr):  # answered calls alone, when some failed
                per_rpc[kind].update({f"ok_p{q}_ms": round(float(np.percentile(ok, q)), 2)
                                      for q in (50, 95, 99)})
        total = sum(len(v) for v in self.latency.values())
        errors = sum(n for c in self.codes.values() for code, n in c.items() if code != "OK")
        a = self.args
        return {"mode": a.mode, "concurrency": a.concurrency if a.mode == "closed" else None,
                "target_rate": a.rate if a.mode == "open" else None, "mix": a.mix,
                "measured_s": round(seconds, 2), "requests": total,
                "throughput_rps": round(total / seconds, 1), "errors": errors,
                "client_overflow": self.overflow, "rpcs": per_rpc}


def summary(result: dict) -> str:
    lines = [f"{result['mode']} loop, {result['measured_s']} s measured: {result['requests']} "
             f"requests, {result['throughput_rps']} req/s, {result['errors']} errors, "
             f"{result['client_overflow']} client overflows",
             f"{'rpc':10s} {'req/s':>9s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} "
             f"{'max ms':>8s}  codes"]
    for kind, r in result["rpcs"].items():
        lines.append(f"{kind:10s} {r['throughput_rps']:9.1f} {r['p50_ms']:8.2f} "
                     f"{r['p95_ms']:8.2f} {r['p99_ms']:8.2f} {r['max_ms']:8.2f}  {r['codes']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranking", default="127.0.0.1:50053")
    p.add_argument("--fusion", default="127.0.0.1:50052")
    p.add_argument("--echo", default="", help="a bare echo server (bench/e2e.py's ceiling)")
    p.add_argument("--mix", default="recommend=0.8,ingest=0.1,profile=0.1")
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--connections", type=int, default=8,
                   help="connections per service, calls round robin over them: a server's "
                        "worker processes (ranking --processes) share connections, not calls")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rate", type=float, default=100.0, help="open loop: requests/s")
    p.add_argument("--max-in-flight", type=int, default=1000)
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--timeout-s", type=float, default=5.0)
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--echo-bytes", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the result here")
    args = p.parse_args(argv)
    if args.duration_s > 600 or args.max_requests > 10_000_000:
        p.error("a load test is bounded: --duration-s <= 600 and --max-requests <= 10,000,000")
    return args


def run_load(args: argparse.Namespace, workload: Workload | None = None) -> dict:
    workload = workload or Workload.from_data(args.users, args.seed)

    async def go():  # aio channels must be made inside the running loop
        return await Runner(args, workload).run()
    return asyncio.run(go())


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run_load(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
