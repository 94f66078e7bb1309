"""The machine a benchmark ran on, recorded with every figure: CPU model and vector
extensions (lscpu), core count."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_model() -> str:
    """E.g. "AMD EPYC (avx2 avx512f avx512_vnni avx512_bf16)"."""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return (fields.get("Model name", "?").strip() + " ("
            + " ".join(f for f in FLAGS if f in flags) + ")")


def machine() -> dict:
    return {"cpu": cpu_model(), "cpus": os.cpu_count()}


def write_results(path: str | os.PathLike, results: dict) -> None:
    """A benchmark's results as indented JSON at `path` (its folder made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
