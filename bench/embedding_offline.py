"""bench/embedding.py's offline part: torch eager and ONNX Runtime fp32 / int8 in this process
on identical pre-tokenized batches, interleaved round by round; FLOPs arithmetic for the
fraction of peak, the one-thread control, op profiles."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import CpuShare, percentiles
from export import encoder as enc
from export import encoder_reference as encref
from recmodel.ortsession import ort_session


@dataclass
class Setup:
    """What every part measures with: the machine, the models and sessions, the titles."""
    cpu: dict
    threads: int
    spinning: bool
    fp32_dir: Path
    int8_dir: Path
    meta: dict
    reference: object  # encref.TorchReference
    tokenizer: object
    names: list
    pad_id: int
    fp32: object  # ORT sessions of the served encoders
    int8: object
    titles: list[str]


# ---------------------------------------------------------------------------------------------
# Model arithmetic.

def fp32_flops_per_cycle(flags: set[str]) -> int:
    """Per core: 2 FMA units x fp32 lanes x 2 FLOPs per FMA."""
    if "avx512f" in flags:
        return 2 * 16 * 2
    if "avx2" in flags and "fma" in flags:
        return 2 * 8 * 2
    return 2 * 4 * 2


def batch_flops(config, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward pass over a [batch, seq] padded batch (bench/embedding.py's
    docstring gives the formula)."""
    h, i = config.hidden_size, config.intermediate_size
    per_token_layer = 2 * (4 * h * h + 2 * h * i) + 4 * seq * h
    return float(config.num_hidden_layers * batch * seq * per_token_layer)


def measured_sgemm_gflops(n: int = 2048, reps: int = 8) -> float:
    """torch fp32 GEMM rate on this machine: a practical ceiling beside the nominal peak."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


# ---------------------------------------------------------------------------------------------
# In-process backends on identical batches.

class Workload:
    """Pre-tokenized batches of one size: feeds plus real and padded token counts."""

    def __init__(self, tokenizer, titles: list[str], batch_size: int, input_names, pad_id,
                 pad_to: int | None = None, shuffle_seed: int | None = None):
        self.batch_size = batch_size
        self.feeds, self.real_tokens, self.shapes = [], [], []
        chunks = list(encref.batches(titles, batch_size))
        if shuffle_seed is not None:
            np.random.default_rng(shuffle_seed).shuffle(chunks)
        for chunk in chunks:
            feeds = encref.encode_batch(tokenizer, chunk, input_names, pad_id, pad_to=pad_to)
            self.feeds.append(feeds)
            self.real_tokens.append(int(feeds["attention_mask"].sum()))
            self.shapes.append(feeds["input_ids"].shape)


def run_offline(backends: dict, workloads: dict[str, Workload], model_config, budget_s: float,
                warmup_batches: int, titles_per_round: int, keep_outputs: bool) -> dict:
    """Interleave `backends` (name -> (callable, workload key)) over rounds of the same batch
    indices until every batch ran or `budget_s` passed. Returns per-backend stats (+ outputs)."""
    names = list(backends)
    n_batches = min(len(workloads[key].feeds) for _, key in backends.values())
    for name in names:
        fn, key = backends[name]
        for feeds in workloads[key].feeds[:warmup_batches]:
            fn(feeds)
    per_round = max(1, titles_per_round // next(iter(workloads.values())).batch_size)
    lat = {n: [] for n in names}
    outputs = {n: [] for n in names}
    start = time.perf_counter()
    done = 0
    rounds = 0
    last_round_s = 0.0
    # Stop before a round that would likely end past the budget (at least one round runs).
    while done < n_batches and (rounds == 0 or
                                time.perf_counter() - start + last_round_s <= budget_s):
        round_start = time.perf_counter()
        idx = range(done, min(done + per_round, n_batches))
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for name in order:
            fn, key = backends[name]
            for i in idx:
                t = time.perf_counter()
                out = fn(workloads[key].feeds[i])
                lat[name].append(time.perf_counter() - t)
                if keep_outputs:
                    outputs[name].append(out)
        done = idx.stop
        rounds += 1
        last_round_s = time.perf_counter() - round_start
    stats = {}
    for name in names:
        stats[name] = backend_stats(workloads[backends[name][1]], lat[name], done, rounds,
                                    model_config)
        if keep_outputs:
            stats[name]["_outputs"] = np.concatenate(outputs[name])
    return stats


def backend_stats(w: Workload, lat: list[float], done: int, rounds: int, model_config) -> dict:
    """Throughput, latency, tokens and FLOP rates of one backend over the first `done`
    batches of its workload."""
    total_s = sum(lat)
    titles = sum(w.shapes[i][0] for i in range(done))
    padded = sum(w.shapes[i][0] * w.shapes[i][1] for i in range(done))
    real = sum(w.real_tokens[i] for i in range(done))
    flops = sum(batch_flops(model_config, *w.shapes[i]) for i in range(done))
    return {"n_batches": done, "n_titles": int(titles), "rounds": rounds,
            "titles_per_s": round(titles / total_s, 1),
            **percentiles(lat, scale=1e3),
            "real_tokens_per_title": round(real / titles, 2),
            "padded_tokens_per_title": round(padded / titles, 2),
            "padded_tokens_per_s": round(padded / total_s, 1),
            "gflops_per_s": round(flops / total_s / 1e9, 2),
            "useful_gflops_per_s": round(flops * real / padded / total_s / 1e9, 2)}


def ort_runner(session):
    return lambda feeds: session.run([encref.OUTPUT_NAME], feeds)[0]


def batch_backends(s: Setup, b: int, seed: int) -> tuple[dict, dict]:
    """(workloads, backends) at batch size b: the three backends padded to the longest text of
    each batch; at 32 also ORT fp32 padded to 128 and on length-sorted batches."""
    workloads = {"longest": Workload(s.tokenizer, s.titles, b, s.names, s.pad_id)}
    backends = {"torch_fp32": (s.reference.run, "longest"),
                "ort_fp32": (ort_runner(s.fp32), "longest"),
                "ort_int8": (ort_runner(s.int8), "longest")}
    if b == 32:
        # What serving the source tokenizer.json unchanged would do: truncate and pad to 128.
        fixed = encref.load_tokenizer(s.fp32_dir / s.meta["tokenizer_file"], 128)
        workloads["fixed128"] = Workload(fixed, s.titles, b, s.names, s.pad_id, pad_to=128)
        backends["ort_fp32_pad128"] = (ort_runner(s.fp32), "fixed128")
        # Length-sorted batches (the bulk-job layout, and what a length-aware batcher could
        # approach): same titles, almost no padding. Batches run in a shuffled order so a
        # run cut short by the budget still samples all lengths.
        lengths = [len(e.ids) for e in s.tokenizer.encode_batch(s.titles)]
        by_length = [s.titles[i] for i in np.argsort(lengths, kind="stable")]
        workloads["sorted"] = Workload(s.tokenizer, by_length, b, s.names, s.pad_id,
                                       shuffle_seed=seed)
        backends["ort_fp32_sorted"] = (ort_runner(s.fp32), "sorted")
    return workloads, backends


def offline_sweep(s: Setup, args, batch_sizes: list[int], peak_gflops: float,
                  sgemm: float) -> tuple[dict, dict]:
    """Every batch size's backends (batch_backends), each under CpuShare; (stats by batch
    size, the cosines of the outputs at 32)."""
    offline = {}
    for b in batch_sizes:
        workloads, backends = batch_backends(s, b, args.seed)
        t = time.perf_counter()
        share = CpuShare(s.cpu["cores"])
        stats = run_offline(backends, workloads, s.reference.config, args.budget_s,
                            warmup_batches=2 if b < 128 else 1,
                            titles_per_round=max(args.titles_per_round, b), keep_outputs=b == 32)
        for st in stats.values():
            st["fraction_of_fp32_peak"] = round(st["gflops_per_s"] / peak_gflops, 3)
            st["fraction_of_measured_sgemm"] = round(st["gflops_per_s"] / sgemm, 3)
        if b == 32:
            outs = {k: v.pop("_outputs") for k, v in stats.items()}
            cosine = {"int8_vs_ort_fp32": enc.compare(outs["ort_fp32"], outs["ort_int8"]),
                      "ort_fp32_vs_torch": enc.compare(outs["torch_fp32"], outs["ort_fp32"])}
        stats["cpu_share"] = share.result()
        offline[str(b)] = stats
        print(f"batch {b:3d} ({time.perf_counter() - t:.0f}s, foreign CPU "
              f"{stats['cpu_share']['foreign_share']:.0%}): " + ", ".join(
                  f"{k} {v['titles_per_s']:.0f}/s p50 {v['p50_ms']:.1f}ms"
                  for k, v in stats.items() if k != "cpu_share"), flush=True)
    return offline, cosine


def offline_ratios(offline: dict) -> dict:
    """The speed ratios between backends and layouts (batch 32 unless named)."""
    at32 = offline["32"]

    def ratio(a: dict, b: dict) -> float:
        return round(a["titles_per_s"] / b["titles_per_s"], 2)
    one = offline["1"]["ort_fp32"] if "1" in offline else None
    return {
        "ort_fp32_vs_torch_batch32": ratio(at32["ort_fp32"], at32["torch_fp32"]),
        "ort_int8_vs_torch_batch32": ratio(at32["ort_int8"], at32["torch_fp32"]),
        "ort_fp32_batch32_vs_batch1": ratio(at32["ort_fp32"], one) if one else None,
        "ort_fp32_sorted_batch32_vs_batch1": ratio(at32["ort_fp32_sorted"], one) if one else None,
        "ort_int8_vs_ort_fp32_batch32": ratio(at32["ort_int8"], at32["ort_fp32"]),
        "ort_fp32_longest_vs_fixed128_batch32": ratio(at32["ort_fp32"], at32["ort_fp32_pad128"]),
        "ort_fp32_sorted_vs_longest_batch32": ratio(at32["ort_fp32_sorted"], at32["ort_fp32"]),
        "per_batch_size": {b: {"ort_fp32_vs_torch": ratio(st["ort_fp32"], st["torch_fp32"]),
                               "ort_int8_vs_torch": ratio(st["ort_int8"], st["torch_fp32"])}
                           for b, st in offline.items()},
    }


def control_1thread(s: Setup, args) -> dict:
    """One thread per backend: a control that survives sharing the cores. With two threads,
    a descheduled OpenMP worker stalls torch at every op's barrier far more than it stalls
    ORT's pool, so on a busy machine the main ratios flatter ORT."""
    import torch

    t = time.perf_counter()
    torch.set_num_threads(1)
    share = CpuShare(s.cpu["cores"])
    fp32_1 = ort_session(s.fp32_dir / "model.onnx", 1, spinning=s.spinning, inter_op_threads=1)
    int8_1 = ort_session(s.int8_dir / "model.onnx", 1, spinning=s.spinning, inter_op_threads=1)
    control = run_offline(
        {"torch_fp32": (s.reference.run, "longest"), "ort_fp32": (ort_runner(fp32_1), "longest"),
         "ort_int8": (ort_runner(int8_1), "longest")},
        {"longest": Workload(s.tokenizer, s.titles, 32, s.names, s.pad_id)},
        s.reference.config, args.budget_s / 2, warmup_batches=1,
        titles_per_round=args.titles_per_round, keep_outputs=False)
    control["cpu_share"] = share.result()
    torch.set_num_threads(s.threads)
    control["ratios"] = {
        "ort_fp32_vs_torch": round(control["ort_fp32"]["titles_per_s"]
                                   / control["torch_fp32"]["titles_per_s"], 2),
        "ort_int8_vs_torch": round(control["ort_int8"]["titles_per_s"]
                                   / control["torch_fp32"]["titles_per_s"], 2)}
    print(f"1-thread control, batch 32 ({time.perf_counter() - t:.0f}s): " + ", ".join(
        f"{k} {control[k]['titles_per_s']:.0f}/s" for k in ("torch_fp32", "ort_fp32",
                                                             "ort_int8"))
        + f"; ratios {control['ratios']}", flush=True)
    return control


# ---------------------------------------------------------------------------------------------
# Where the time goes at batch 32: the evidence behind the ratios.

def op_profiles(s: Setup, n_batches: int) -> dict:
    t = time.perf_counter()
    feeds = Workload(s.tokenizer, s.titles, 32, s.names, s.pad_id).feeds[:n_batches]
    model = {"ort_fp32": s.fp32_dir / "model.onnx", "ort_int8": s.int8_dir / "model.onnx"}
    profiles = {"batch_size": 32, "batches": len(feeds),
                "torch_fp32": torch_op_profile(s.reference, feeds),
                **{k: ort_op_profile(path, s.threads, s.spinning, feeds)
                   for k, path in model.items()}}
    print(f"profiles ({time.perf_counter() - t:.0f}s): " + "; ".join(
        f"{k}: " + ", ".join(f"{op} {v['share']:.0%}" for op, v in list(p["top"].items())[:4])
        for k, p in profiles.items() if isinstance(p, dict)), flush=True)
    return profiles


def ort_op_profile(model_path: Path, threads: int, spinning: bool, feeds: list) -> dict:
    """Share of ORT kernel time per op type over `feeds` (ORT's own profiler), top 10."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if spinning else "0")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(model_path), options,
                                       providers=["CPUExecutionProvider"])
        for f in feeds:
            session.run(None, f)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3
    return _shares(by_op)


def torch_op_profile(reference, feeds: list) -> dict:
    """Share of torch self CPU time per aten op over `feeds` (torch.profiler), top 10."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for f in feeds:
            reference.run(f)
    by_op = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    return _shares(by_op)


def _shares(ms_by_op: dict[str, float], top: int = 10) -> dict:
    total = sum(ms_by_op.values())
    ranked = sorted(ms_by_op.items(), key=lambda kv: -kv[1])[:top]
    return {"total_ms": round(total, 1),
            "top": {op: {"ms": round(ms, 1), "share": round(ms / total, 3)} for op, ms in ranked}}


def tokenization_us_per_title(tokenizer, titles: list[str], batch_size: int = 32) -> float:
    start = time.perf_counter()
    for chunk in encref.batches(titles, batch_size):
        tokenizer.encode_batch(chunk)
    return (time.perf_counter() - start) / len(titles) * 1e6
