"""Publish, the step encoder, user tower and ranker end with: a torch module exported to ONNX,
the parity gate of ONNX Runtime against torch, and the versioned write into the model
repository (recmodel.modelrepo.new_version: meta.json last, then one rename; nothing
appears when a gate or anything else fails)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from recmodel.modelrepo import new_version, write_meta

OPSET = 17
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class OnnxIO:
    """A graph's contract: input and output names in order, and their dynamic axes
    ({name: {axis: label}})."""
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict


def export_onnx(module, args: tuple, path: str | os.PathLike, io: OnnxIO,
                opset: int = OPSET) -> None:
    """Trace `module` on `args` (torch tensors in io.inputs order) into the ONNX file `path`,
    constants folded. The TorchScript-based exporter (dynamo=False) is deprecated but is the one
    these contracts were validated with; its warning says nothing about the model."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                          input_names=list(io.inputs), output_names=list(io.outputs),
                          dynamic_axes=io.dynamic_axes, do_constant_folding=True)


def parity_gate(module, run_onnx: Callable[[dict], tuple], feed_sets: list[dict], io: OnnxIO,
                tolerance: float) -> dict[str, float]:
    """Worst |ONNX Runtime - torch| of each output over every feed set, {output: float}.

    A feed set is {input name: numpy array}; torch runs `module` on the io.inputs of it (no
    grad), `run_onnx(feeds)` returns the ONNX Runtime outputs in io.outputs order. RuntimeError
    when the worst is over `tolerance` (nothing is published then)."""
    import torch

    worst = dict.fromkeys(io.outputs, 0.0)
    for feeds in feed_sets:
        with torch.no_grad():
            ref = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in io.inputs))
        ref = ref if isinstance(ref, tuple) else (ref,)
        for name, r, g in zip(io.outputs, ref, run_onnx(feeds)):
            worst[name] = max(worst[name], float(np.abs(r.numpy() - g).max()))
    if not max(worst.values()) <= tolerance:
        raise RuntimeError(f"ONNX parity failed: max abs diff {max(worst.values()):.3g} > "
                           f"{tolerance:g} ({worst})")
    return worst


def publish(repo: str | os.PathLike, name: str,
            stage: Callable[[Path], dict]) -> tuple[Path, dict]:
    """A new version of `name` in `repo`: stage(dir) writes the version's files into dir (a
    temporary directory beside the versions) and returns its meta; meta.json, with name and
    version added, is written last and the directory renamed into place. Returns (the version's
    directory, its meta)."""
    with new_version(repo, name) as (tmp, version):
        meta = dict(stage(tmp), name=name, version=version)
        write_meta(tmp, meta)
    return Path(repo) / name / str(version), meta


def publish_onnx(repo: str | os.PathLike, name: str, module, args: tuple, io: OnnxIO,
                 parity: Callable[[Path], dict], meta: dict,
                 finish: Callable[[Path, dict], dict] | None = None) -> tuple[Path, dict]:
    """publish a torch module: export it to MODEL_FILE, parity(onnx path) -> the parity figures
    (raising on a miss), then finish(version dir, meta) -> meta writes any other file and adds
    figures measured on the exported file."""
    def stage(tmp: Path) -> dict:
        onnx_path = tmp / MODEL_FILE
        export_onnx(module, args, onnx_path, io)
        staged = dict(meta, parity=parity(onnx_path))
        return finish(tmp, staged) if finish is not None else staged

    return publish(repo, name, stage)


def created_at() -> str:
    """meta.json's created_at: now, UTC, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def torch_exporter() -> dict:
    """meta.json's exporter of a model trained here: torch and python versions, torch threads."""
    import torch

    return {"torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
