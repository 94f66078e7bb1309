"""Where a served Recommend's time goes: py-spy samples of the server processes under one
closed-loop caller, summarised per process (bench/e2e.py's --profile-s)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.common import git_sha
from bench.stack_data import load_args
from tools.loadtest import run_load

IDLE = ("Condition.wait", "_worker (concurrent", "select (selectors", "Event.wait",
        "_poll", "channel_spin", "_wait_once", "_serve (grpc")


def profile_servers(pids: dict[str, int], seconds: float, out_dir: Path, workload,
                    **targets) -> dict:
    """py-spy (`pip install py-spy`) samples each server process for `seconds` while one
    closed-loop caller drives Recommend; each profile is summarised into
    out_dir/profile-<name>.txt (self and inclusive time by function, idle threads left out)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spies = {}
    for name, pid in pids.items():
        raw = out_dir / f"profile-{name}.raw"
        spies[name] = (raw, subprocess.Popen(
            # --subprocesses: ranking's worker processes are children of its parent
            ["py-spy", "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "-f",
             "raw", "-o", str(raw), "--nonblocking", "--subprocesses"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
    result = run_load(load_args(mode="closed", concurrency=1, duration_s=seconds, warmup_s=0,
                                max_requests=10**6, **targets), workload)
    load = (f"Recommend c=1: {result['throughput_rps']} req/s, "
            f"p50 {next(iter(result['rpcs'].values()))['p50_ms']} ms")
    for name, (raw, spy) in spies.items():
        spy.wait(seconds + 30)
        if raw.is_file():
            header = (f"# {name} process(es), py-spy record -r 200 -d {int(seconds)} --nonblocking "
                      "--subprocesses "
                      f"at git {git_sha()}\n# load during the profile: {load}\n")
            (out_dir / f"profile-{name}.txt").write_text(header + summarise(raw.read_text()))
            raw.unlink()
    return {"load": load, "files": sorted(str(p) for p in out_dir.glob("profile-*.txt"))}


def summarise(raw: str, top: int = 25) -> str:
    """Self and inclusive sample shares per function of py-spy's raw (collapsed) stacks,
    stacks whose innermost frame only waits left out."""
    selfc, incl, total = {}, {}, 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")"
                  if " (" in f else f for f in stack.split(";")]
        if any(frames[-1].startswith(i) for i in IDLE):
            continue
        n = int(count)
        total += n
        selfc[frames[-1]] = selfc.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    def table(d):
        rows = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return "\n".join(f"  {100 * n / max(total, 1):6.1f}%  {f}" for f, n in rows)
    return (f"\n## busy samples: {total} (threads waiting left out)\nself (top {top})\n"
            f"{table(selfc)}\ninclusive (top {top})\n{table(incl)}\n")
