"""What every benchmark records with its figures: command line, git state, the machine (and how
much of it other processes took), percentiles, process CPU time; and the results file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL_REPO = os.environ.get("CROSSREC_MODEL_REPO", str(REPO / "models"))
# The vector extensions a CPU description names, when the CPU has them.
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


# ---------------------------------------------------------------------------- the run

def command_line(python: str | None = None) -> str:
    """This process's command line as `python -m bench.<topic> args` (`python`: the
    interpreter as the results file should show it; default the executable's name)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    # Run other than with -m (a test, a script): argv[0] is all there is to name it.
    head = ["-m", spec.name] if spec is not None else sys.argv[:1]
    return " ".join([python or Path(sys.executable).name, *head, *sys.argv[1:]])


def git(*args: str) -> str:
    """git's stdout in the repository, stripped ("" where git cannot run)."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def git_sha(short: bool = True) -> str:
    """HEAD's commit, abbreviated unless short=False ("unknown" outside a git checkout)."""
    return git("rev-parse", *(["--short"] if short else []), "HEAD") or "unknown"


def git_dirty() -> bool:
    """Whether tracked files differ from HEAD."""
    return bool(git("status", "--porcelain", "--untracked-files=no"))


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_results(path: str | os.PathLike, results: dict) -> None:
    """A benchmark's results as indented JSON at `path` (its folder made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


# ---------------------------------------------------------------------------- the machine

def cpu_info() -> dict:
    """Model name, clock (MHz, first core) and every flag (a set) from /proc/cpuinfo, and the
    cores usable by this process."""
    info = {"model": platform.processor() or platform.machine(), "mhz": None, "flags": set()}
    seen = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in seen or key not in ("model name", "cpu MHz", "flags"):
                continue
            seen.add(key)
            if key == "model name":
                info["model"] = value
            elif key == "cpu MHz":
                info["mhz"] = float(value)
            else:
                info["flags"] = set(value.split())
    except OSError:
        pass
    info["cores"] = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count() or 1)
    return info


def cpu_flags() -> dict:
    """Model name and which of FLAGS the CPU has."""
    info = cpu_info()
    return {"model": info["model"], "flags": [f for f in FLAGS if f in info["flags"]]}


def cpu_model() -> str:
    """E.g. "AMD EPYC (avx2 avx512f avx512_vnni avx512_bf16)"."""
    cpu = cpu_flags()
    return f"{cpu['model']} ({' '.join(cpu['flags'])})"


def machine() -> dict:
    return {"cpu": cpu_model(), "cpus": os.cpu_count()}


class CpuShare:
    """How much of the machine others used while we measured: the validity flag of a run on
    shared cores. foreign_share = (all busy CPU time - ours) / (wall x cores); steal_share is
    the hypervisor's. Under contention torch's OpenMP barriers stall far more than ORT's pool,
    so ratios taken with a high foreign share overstate ORT's lead."""

    def __init__(self, cores: int, pids: list[int] | None = None):
        self.cores, self.pids = cores, pids or []
        self.start = self._snapshot()

    @staticmethod
    def _machine() -> tuple[float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        return (user + nice + system + irq + softirq) / tick, steal / tick

    def _own(self) -> float:
        total = time.process_time()
        for pid in self.pids:
            try:
                total += process_cpu_s(pid)
            except (OSError, IndexError):
                pass
        return total

    def _snapshot(self):
        busy, steal = self._machine()
        return time.perf_counter(), busy, steal, self._own()

    def result(self) -> dict:
        wall, busy, steal, own = (b - a for a, b in zip(self.start, self._snapshot()))
        capacity = max(wall * self.cores, 1e-9)
        return {"own_share": round(own / capacity, 3),
                "foreign_share": round(max(busy - own, 0.0) / capacity, 3),
                "steal_share": round(steal / capacity, 3)}


def wait_for_quiet(cores: int, max_foreign_share: float, max_wait_s: float) -> dict:
    """Wait (bounded) until other processes use at most `max_foreign_share` of the cores over
    a 2 s window, so the run starts on a quiet machine when one comes. Returns the last window."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        share = CpuShare(cores)
        time.sleep(2.0)
        window = share.result()
        if window["foreign_share"] <= max_foreign_share or time.perf_counter() >= deadline:
            return window
        print(f"waiting for a quiet machine: others use {window['foreign_share']:.0%} "
              f"of the cores", flush=True)


# ---------------------------------------------------------------------------- figures

def percentiles(values, scale: float = 1.0, digits: int = 3,
                qs: tuple[int, ...] = (50, 95, 99)) -> dict:
    """{"p50_ms": ..., "p95_ms": ..., "p99_ms": ...} (or those of `qs`) of `values` x `scale`
    (1000 for seconds), rounded to `digits`."""
    a = np.asarray(values) * scale
    return {f"p{q}_ms": round(float(np.percentile(a, q)), digits) for q in qs}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat; OSError if gone)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds of each process and its live children (worker processes)
    so far ({} where /proc is missing)."""
    out = {}
    for name, pid in pids.items():
        total = 0.0
        for one in [pid, *_children(pid)]:
            try:
                total += process_cpu_s(one)
            except OSError:
                continue
        if total or Path(f"/proc/{pid}").exists():
            out[name] = total
    return out
