"""End-to-end benchmark: all three services on this machine with the real catalogue and real
users; Recommend latency/throughput at increasing concurrency, a sustained fixed-rate run, and
in the same run a bare gRPC echo server (same server settings, same load tool) as the ceiling
for any Python gRPC service on this box. Writes bench/results/e2e.{json,png}.

    .venv/bin/python bench/e2e.py [--levels 1,2,4,8,16,32,64] [--level-s 8] [--sustain-s 30]
    .venv/bin/python bench/e2e.py --serve-echo --port-file F     (the echo server itself)

Services run as separate processes on 127.0.0.1; the load generator (clients/loadtest.py,
asyncio) is a process of its own and shares the 2 cores with them, for the echo server alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "gen"), str(REPO)]

import grpc  # noqa: E402

from clients.datasets import AMAZON, read_items, user_events  # noqa: E402
from clients.loadtest import ECHO_METHOD, Workload, parse_args, run_load  # noqa: E402
from clients.stack import ServiceProcess, python_env, start_stack  # noqa: E402
from crossrec.common.v1 import common_pb2  # noqa: E402
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc  # noqa: E402
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc  # noqa: E402

RESULTS = REPO / "bench" / "results"


def serve_echo(port_file: str) -> int:
    """A bare gRPC server with the services' settings that returns the request bytes."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64),
                         maximum_concurrent_rpcs=512)
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    service, method = ECHO_METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        service, {method: handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    return 0


def start_echo(run_dir: Path) -> tuple[subprocess.Popen, str]:
    port_file = run_dir / "echo.port"
    proc = subprocess.Popen([sys.executable, __file__, "--serve-echo", "--port-file",
                             str(port_file)], env=python_env())
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("echo server did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text()}"


def load_data(procs: dict[str, ServiceProcess], n_users: int, n_items: int) -> Workload:
    items = read_items(AMAZON)[:n_items or None]
    with grpc.insecure_channel(procs["ranking"].address) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        for start in range(0, len(items), 500):
            stub.UpsertItems(ranking_pb2.UpsertItemsRequest(items=[ranking_pb2.Item(
                item_id=r["item_id"], platform=r["platform"], title=r["title"],
                attributes=r["attributes"]) for r in items[start:start + 500]]), timeout=300)
            print(f"\r  catalogue {min(start + 500, len(items)):,}/{len(items):,}", end="",
                  flush=True)
    print()
    users = user_events(AMAZON, users=n_users)
    with grpc.insecure_channel(procs["fusion"].address) as channel:
        fusion_pb2_grpc.FusionServiceStub(channel).IngestStream(iter([
            fusion_pb2.IngestRequest(events=[common_pb2.BehaviorEvent(
                **{k: v for k, v in e.items() if v is not None}) for e in events])
            for events in users.values()]), timeout=600)
    print(f"  {len(users)} users ingested")
    events = [e for es in users.values() for e in es]
    return Workload(list(users), events, ["arts_crafts", "office"])


def load_args(**kw) -> argparse.Namespace:
    argv = []
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parse_args(argv)


def curve(levels, level_s, workload, **targets) -> list[dict]:
    out = []
    for level in levels:
        result = run_load(load_args(mode="closed", concurrency=level, duration_s=level_s,
                                    warmup_s=1, max_requests=10**6, **targets), workload)
        rpc = next(iter(result["rpcs"].values()))
        row = {"concurrency": level, "throughput_rps": result["throughput_rps"],
               "p50_ms": rpc["p50_ms"], "p99_ms": rpc["p99_ms"], "errors": result["errors"]}
        print(f"    c={level:3d}  {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:7.2f} ms"
              f"  p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}", flush=True)
        out.append(row)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in (("crossrec Recommend", results["recommend_curve"]),
                       ("bare echo (ceiling)", results["echo_curve"])):
        axes[0].plot([r["throughput_rps"] for r in rows], [r["p99_ms"] for r in rows],
                     marker="o", label=name)
        for r in rows:
            axes[0].annotate(str(r["concurrency"]), (r["throughput_rps"], r["p99_ms"]),
                             fontsize=7)
    axes[0].axhline(15, color="k", ls="--", lw=1, label="p99 target 15 ms")
    axes[0].set_xlabel("throughput (req/s)")
    axes[0].set_ylabel("p99 latency (ms)")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("latency vs throughput (labels: concurrent callers)")
    s = results["sustained"]
    axes[1].bar(["p50", "p95", "p99", "max"],
                [s["p50_ms"], s["p95_ms"], s["p99_ms"], s["max_ms"]])
    axes[1].axhline(15, color="k", ls="--", lw=1)
    axes[1].set_ylabel("ms")
    axes[1].set_title(f"Recommend at {s['target_rate']} req/s for {s['measured_s']} s: "
                      f"{s['errors']} errors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve-echo", action="store_true")
    p.add_argument("--port-file", default="")
    p.add_argument("--levels", default="1,2,4,8,16,32,64")
    p.add_argument("--level-s", type=float, default=8)
    p.add_argument("--sustain-rate", type=float, default=300)
    p.add_argument("--sustain-s", type=float, default=30)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=0, help="catalogue items; 0 = all 38,396")
    p.add_argument("--model-repo", default=os.environ.get("CROSSREC_MODEL_REPO",
                                                          str(REPO / "models")))
    args = p.parse_args(argv)
    if args.serve_echo:
        return serve_echo(args.port_file)
    levels = [int(x) for x in args.levels.split(",")]
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                         capture_output=True, text=True).stdout.strip(),
               "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        print("starting the stack and loading the real catalogue and users", flush=True)
        procs = start_stack(Path(tmp), args.model_repo)
        echo, echo_address = start_echo(Path(tmp))
        try:
            workload = load_data(procs, args.users, args.items)
            time.sleep(11)  # one popularity refresh in ranking
            targets = dict(ranking=procs["ranking"].address, mix="recommend=1")
            print("  Recommend, closed loop", flush=True)
            results["recommend_curve"] = curve(levels, args.level_s, workload, **targets)
            print("  echo ceiling, closed loop", flush=True)
            results["echo_curve"] = curve(levels, args.level_s, workload, echo=echo_address,
                                          mix="echo=1")
            print(f"  sustained Recommend at {args.sustain_rate} req/s", flush=True)
            sustained = run_load(load_args(mode="open", rate=args.sustain_rate,
                                           duration_s=args.sustain_s, warmup_s=2,
                                           max_requests=10**6, **targets), workload)
            rpc = sustained["rpcs"]["recommend"]
            results["sustained"] = {"target_rate": args.sustain_rate,
                                    "measured_s": sustained["measured_s"],
                                    "throughput_rps": sustained["throughput_rps"],
                                    "errors": sustained["errors"],
                                    "client_overflow": sustained["client_overflow"],
                                    **{k: rpc[k] for k in ("p50_ms", "p95_ms", "p99_ms",
                                                           "max_ms")}}
            print(f"    {results['sustained']}", flush=True)
        finally:
            echo.send_signal(signal.SIGTERM)
            echo.wait(10)
            results["exit_codes"] = {n: p.stop() for n, p in reversed(list(procs.items()))}
    peak = max(r["throughput_rps"] for r in results["recommend_curve"])
    ceiling = max(r["throughput_rps"] for r in results["echo_curve"])
    s = results["sustained"]
    results["summary"] = {
        "recommend_peak_rps": peak, "echo_ceiling_rps": ceiling,
        "fraction_of_ceiling": round(peak / ceiling, 3),
        "targets": {"sustained_p99_ms_max": 15, "sustained_rate_min": 300,
                    "fraction_of_ceiling_min": 0.30,
                    "sustained_met": s["p99_ms"] <= 15 and s["errors"] == 0
                    and s["throughput_rps"] >= 0.97 * args.sustain_rate
                    and args.sustain_rate >= 300 and args.sustain_s >= 30,
                    "ceiling_met": peak / ceiling >= 0.30}}
    print(json.dumps(results["summary"], indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "e2e.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "e2e.png")
    print(f"wrote {RESULTS / 'e2e.json'} and e2e.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
