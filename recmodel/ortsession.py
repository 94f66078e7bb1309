"""The one ONNX Runtime session factory: serving (embedding, fusion, ranking) and export (parity
gates, validation, benchmarks) build every InferenceSession here, so graph optimisation, thread
counts, spinning and the provider choice are decided in one place. Torch-free; onnxruntime is
imported on first use, as the services did before."""

from __future__ import annotations

import os

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def choose_providers(device: str) -> list[str]:
    """ORT providers for `device` ("auto": CUDA when ONNX Runtime has it, else CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise RuntimeError(f"--device cuda asked for, but ONNX Runtime offers only {available}"
                               " (install with GPU=1 on a machine with CUDA)")
        return [CUDA, CPU]
    if device != "auto":
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return [CUDA, CPU] if CUDA in available else [CPU]


def ort_session(path: str | os.PathLike, intra_op_threads: int, device: str = "cpu",
                spinning: bool = False, inter_op_threads: int = 0):
    """InferenceSession of the ONNX file `path` with every graph optimisation (ORT_ENABLE_ALL,
    also ORT's default), `intra_op_threads` threads per call and the providers of `device`
    (choose_providers).

    `spinning=False` (serving, and export next to it): idle intra-op threads sleep instead of
    spinning, which would steal shared cores from gRPC and numpy between calls; spinning never
    changes an output. `inter_op_threads` 0 leaves ORT's default (sequential execution does
    not use that pool)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=choose_providers(device))
