"""bench/embedding.py's served part: the embedding server in each SERVED_CONFIGS layout on
loopback, 64 concurrent single-title callers, rounds interleaved with the offline ceiling of
the same engine; then the fairness round."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from bench.ceiling import engine_ceiling
from bench.common import CpuShare, percentiles
from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from export import encoder as enc
from recmodel import modelrepo
from tools.stack import ServiceProcess

SERVED_CONFIGS = {
    # name: (model, extra server flags)
    "dynamic_fp32": (enc.FP32_NAME, []),
    "dynamic_int8": (enc.INT8_NAME, []),
    "dynamic_fp32_one_worker": (enc.FP32_NAME, ["--model-workers", "1"]),
    "batch1_fp32": (enc.FP32_NAME, ["--max-batch-size", "1"]),
}
# The fairness round: one caller sends LONG_TEXTS texts of ~4 KB per call back to back while
# another sends single titles with a SMALL_DEADLINE_S deadline.
LONG_TEXTS, SMALL_DEADLINE_S = 256, 1.0


async def _drive(address: str, titles: list[str], offset: int, n_requests: int,
                 max_seconds: float, concurrency: int) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    state = {"next": 0}
    deadline = time.perf_counter() + max_seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)

        async def caller():
            while state["next"] < n_requests and time.perf_counter() < deadline:
                i = state["next"]
                state["next"] += 1
                request = embedding_pb2.EmbedRequest(texts=[titles[(offset + i) % len(titles)]])
                t = time.perf_counter()
                try:
                    await stub.Embed(request, timeout=30)
                    latencies.append(time.perf_counter() - t)
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1

        cpu0, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu0
    return {"latencies": latencies, "errors": errors, "wall_s": wall, "client_cpu_s": cpu}


def _served_vectors(address: str, titles: list[str]) -> np.ndarray:
    with grpc.insecure_channel(address) as channel:
        reply = embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
            embedding_pb2.EmbedRequest(texts=titles), timeout=60)
    return np.array([list(e.values) for e in reply.embeddings], dtype=np.float32)


def titles_ceiling(model_dir: Path, titles: list[str], seconds: float,
                   group: int | None = None) -> dict:
    """bench/ceiling.py's engine_ceiling on the titles (group: texts ever waiting)."""
    top = engine_ceiling(model_dir, titles, seconds, group)
    return {"titles_per_s": top["texts_per_s"],
            "cpu_s_per_1000_titles": top["cpu_s_per_1000_texts"]}


def fairness_round(address: str, titles: list[str], small_calls: int) -> dict:
    """While one caller sends LONG_TEXTS ~4 KB texts per call back to back, another sends
    `small_calls` single titles one after another, each with a SMALL_DEADLINE_S deadline."""
    long_texts = [f"{n} " + "a long catalogue description of a product " * 100
                  for n in range(LONG_TEXTS)]
    stop, long_done, long_s = threading.Event(), [], []
    with grpc.insecure_channel(address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)

        def big():
            while not stop.is_set():
                t = time.perf_counter()
                stub.Embed(embedding_pb2.EmbedRequest(texts=long_texts), timeout=300)
                long_s.append(time.perf_counter() - t)
                long_done.append(1)
        thread = threading.Thread(target=big, daemon=True)
        thread.start()
        time.sleep(1.0)
        latencies, errors = [], {}
        for n in range(small_calls):
            t = time.perf_counter()
            try:
                stub.Embed(embedding_pb2.EmbedRequest(texts=[titles[n % len(titles)]]),
                           timeout=SMALL_DEADLINE_S)
                latencies.append(time.perf_counter() - t)
            except grpc.RpcError as err:
                errors[err.code().name] = errors.get(err.code().name, 0) + 1
        stop.set()
        thread.join(300)
    return {"long_texts_per_call": LONG_TEXTS, "long_calls_done": len(long_done),
            "long_call_s_p50": round(float(np.median(long_s)), 2) if long_s else None,
            "small_deadline_s": SMALL_DEADLINE_S, "small_calls": small_calls,
            "small_ok": len(latencies), "small_errors": errors,
            **({f"small_{k}": v for k, v in percentiles(latencies, scale=1e3).items()}
               if latencies else {})}


def run_served(args, titles: list[str], offline_fp32, cores: int) -> dict:
    """Each SERVED_CONFIGS server on loopback, 64 single-title callers, rounds interleaved
    with the offline ceiling of the same engine (titles_ceiling), then the fairness round."""
    run_dir = Path(tempfile.mkdtemp(prefix="crossrec-bench-embedding-"))
    procs = {}
    result = {"concurrency": args.concurrency, "titles_per_call": 1,
              "requests_per_round": args.served_requests, "round_max_s": args.served_seconds,
              "configs": {name: {"model": model, "server_args": flags}
                          for name, (model, flags) in SERVED_CONFIGS.items()}}
    ceilings = {m: [] for m in (enc.FP32_NAME, enc.INT8_NAME)}
    in_flight = {m: [] for m in ceilings}
    try:
        start_servers(args, run_dir, procs)
        check_and_warm(args, procs, titles, offline_fp32, result)
        share = CpuShare(cores, [p.proc.pid for p in procs.values()])
        runs = served_rounds(args, procs, titles, ceilings, in_flight)
        result["cpu_share"] = share.result()
        result["fairness"] = fairness_round(procs["dynamic_fp32"].address, titles,
                                            args.fairness_calls)
        print(f"fairness: {result['fairness']}", flush=True)
        for name, rs in runs.items():
            result["configs"][name].update(served_stats(rs))
    finally:
        for name, proc in procs.items():
            code = proc.stop()
            if name in result["configs"]:
                result["configs"][name]["exit_code"] = code
            if code != 0:
                print(f"served: {name} exited {code}:\n{proc.log_tail()}", flush=True)
        if all(result["configs"][n].get("exit_code") == 0 for n in procs):
            shutil.rmtree(run_dir, ignore_errors=True)  # server logs: kept only on failure
    against_ceilings(result, ceilings, in_flight, args.concurrency)
    return result


def start_servers(args, run_dir: Path, procs: dict) -> None:
    """Every SERVED_CONFIGS server started into `procs`, then each waited for."""
    t0 = time.perf_counter()
    for name, (model, flags) in SERVED_CONFIGS.items():
        procs[name] = ServiceProcess("embedding", ["--model-repo", str(args.model_repo),
                                                   "--model-name", model, *flags],
                                     run_dir / name).start()
    for name, proc in procs.items():
        proc.wait_ready(args.startup_timeout_s)
        print(f"served: {name} SERVING on {proc.address} "
              f"({time.perf_counter() - t0:.1f}s after start)", flush=True)


def check_and_warm(args, procs: dict, titles: list[str], offline_fp32, result: dict) -> None:
    """The fp32 servers' vectors against the offline session's; a warm-up of each server."""
    check = titles[:16]
    for name, proc in procs.items():
        if SERVED_CONFIGS[name][0] == enc.FP32_NAME:
            served = _served_vectors(proc.address, check)
            result["configs"][name]["vs_offline_max_abs_diff"] = float(
                np.max(np.abs(served - offline_fp32(check))))
        asyncio.run(_drive(proc.address, titles, 0, 4 * args.concurrency, 30,
                           args.concurrency))  # warm-up: threads, channels, shapes


def served_rounds(args, procs: dict, titles: list[str], ceilings: dict,
                  in_flight: dict) -> dict[str, list[dict]]:
    """args.served_rounds rounds: both ceilings of each model, then every server in turn
    (the order reversed every other round); each server's runs."""
    runs = {name: [] for name in procs}
    for r in range(args.served_rounds):
        for model in ceilings:
            model_dir = modelrepo.resolve(args.model_repo, model)
            ceilings[model].append(titles_ceiling(model_dir, titles, args.ceiling_s))
            in_flight[model].append(titles_ceiling(model_dir, titles, args.ceiling_s,
                                                   group=args.concurrency))
        order = list(procs) if r % 2 == 0 else list(reversed(procs))
        for name in order:
            run = asyncio.run(_drive(procs[name].address, titles, r * args.served_requests,
                                     args.served_requests, args.served_seconds,
                                     args.concurrency))
            runs[name].append(run)
            print(f"served round {r} {name}: {len(run['latencies'])} calls in "
                  f"{run['wall_s']:.1f}s = {len(run['latencies']) / run['wall_s']:.0f}/s "
                  f"errors {run['errors']}", flush=True)
        print(f"offline ceiling round {r}: " + ", ".join(
            f"{m} {c[-1]['titles_per_s']:.0f}/s (groups of {args.concurrency}: "
            f"{in_flight[m][-1]['titles_per_s']:.0f}/s)" for m, c in ceilings.items()),
            flush=True)
    return runs


def served_stats(rs: list[dict]) -> dict:
    """One server's rounds together: calls, errors, throughput, latency, client CPU."""
    lat = [x for run in rs for x in run["latencies"]]
    wall = sum(run["wall_s"] for run in rs)
    errors: dict[str, int] = {}
    for run in rs:
        for code, count in run["errors"].items():
            errors[code] = errors.get(code, 0) + count
    return {"calls_ok": len(lat), "errors": errors, "wall_s": round(wall, 2),
            "titles_per_s": round(len(lat) / wall, 1), **percentiles(lat, scale=1e3),
            "client_cpu_s": round(sum(run["client_cpu_s"] for run in rs), 2)}


def against_ceilings(result: dict, ceilings: dict, in_flight: dict, group: int) -> None:
    """The ceilings' means, each server's throughput as a share of them, and dynamic batching
    on vs off, into `result`."""
    result["offline_ceiling"] = {
        m: {"titles_per_s": round(float(np.mean([c["titles_per_s"] for c in cs])), 1),
            "rounds": cs} for m, cs in ceilings.items()}
    result["offline_ceiling_in_flight"] = {
        m: {"group": group,
            "titles_per_s": round(float(np.mean([c["titles_per_s"] for c in cs])), 1),
            "rounds": cs} for m, cs in in_flight.items()}
    for c in result["configs"].values():
        ceiling = result["offline_ceiling"][c["model"]]["titles_per_s"]
        c["vs_offline_ceiling"] = round(c["titles_per_s"] / ceiling, 3)
        c["vs_offline_in_flight_ceiling"] = round(
            c["titles_per_s"] / result["offline_ceiling_in_flight"][c["model"]]["titles_per_s"],
            3)
    configs = result["configs"]
    result["ratio_on_vs_off"] = round(configs["dynamic_fp32"]["titles_per_s"]
                                      / configs["batch1_fp32"]["titles_per_s"], 2)
