"""Encoder export: the published meta.json contract, the parity gates, never-overwrite versions."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from export.encoder import (INT8_GATE_MEAN_COSINE, PARITY_MAX_ABS_DIFF, PARITY_MIN_COSINE,
                            check_int8, check_parity, max_sequence_tokens)
from services.common import modelrepo

META_KEYS = {"name", "version", "format", "precision", "opset", "input_names", "output_names",
             "dim", "max_sequence_tokens", "pooling", "normalized", "source_model",
             "tokenizer_file", "pad_token_id", "exporter", "created_at", "parity"}


def _unit_rows(n: int = 64, dim: int = 384, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exported_encoder_meta_has_every_key_and_parity_within_tolerance(model_repo):
    meta = modelrepo.read_meta(modelrepo.resolve(model_repo, "encoder"))
    assert META_KEYS <= meta.keys(), f"missing: {META_KEYS - meta.keys()}"
    assert meta["name"] == "encoder" and meta["format"] == "onnx" and meta["precision"] == "fp32"
    assert meta["pooling"] == "mean" and meta["normalized"] is True
    assert meta["output_names"] == ["embedding"]
    assert meta["input_names"][:2] == ["input_ids", "attention_mask"]
    assert set(meta["exporter"]) == {"torch", "transformers", "onnx", "onnxruntime"}
    assert {"path", "name_or_path"} <= meta["source_model"].keys()
    parity = meta["parity"]
    assert parity["tolerance"] == {"max_abs_diff": PARITY_MAX_ABS_DIFF,
                                   "min_cosine": PARITY_MIN_COSINE}
    assert parity["n_texts"] > 0
    assert parity["max_abs_diff"] <= PARITY_MAX_ABS_DIFF
    assert parity["min_cosine"] >= PARITY_MIN_COSINE
    assert parity["mean_cosine"] >= parity["min_cosine"]


def test_exported_int8_meta_records_quantization_and_passes_its_gate(model_repo):
    meta = modelrepo.read_meta(modelrepo.resolve(model_repo, "encoder_int8"))
    assert META_KEYS <= meta.keys(), f"missing: {META_KEYS - meta.keys()}"
    assert meta["precision"] == "int8"
    assert {k: meta["quantization"][k] for k in ("method", "per_channel", "weight_type")} == {
        "method": "dynamic", "per_channel": True, "weight_type": "QInt8"}
    gate = meta["parity_vs_fp32"]
    assert gate["gate_mean_cosine"] == INT8_GATE_MEAN_COSINE
    assert gate["n_texts"] > 0 and gate["mean_cosine"] >= INT8_GATE_MEAN_COSINE


@pytest.mark.parametrize("name", ["encoder", "encoder_int8"])
def test_exported_graph_io_and_tokenizer_match_meta(model_repo, name):
    model_dir = modelrepo.resolve(model_repo, name)
    meta = modelrepo.read_meta(model_dir)
    session = ort.InferenceSession(str(model_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == meta["input_names"]
    assert all(i.type == "tensor(int64)" for i in session.get_inputs())
    (output,) = session.get_outputs()
    assert output.name == "embedding" and output.type == "tensor(float)"
    assert output.shape[1] == meta["dim"] and not isinstance(output.shape[0], int)
    # Serving loads this file as is: it must truncate at max_sequence_tokens and not pad.
    tokenizer = Tokenizer.from_file(str(model_dir / meta["tokenizer_file"]))
    assert tokenizer.truncation["max_length"] == meta["max_sequence_tokens"]
    assert tokenizer.padding is None


def test_parity_gate_passes_identical_outputs_and_reports_figures():
    reference = _unit_rows()
    figures = check_parity(reference, reference.copy())
    assert figures["max_abs_diff"] == 0.0 and figures["n_texts"] == 64
    assert figures["min_cosine"] == pytest.approx(1.0)


def test_parity_gate_rejects_one_perturbed_value():
    reference = _unit_rows()
    candidate = reference.copy()
    candidate[7, 3] += 1e-3
    with pytest.raises(SystemExit, match="max abs diff"):
        check_parity(reference, candidate, max_abs_diff=1e-4, min_cosine=0.9999)


def test_parity_gate_rejects_one_wrong_direction_by_cosine():
    reference = _unit_rows()
    candidate = reference.copy()
    candidate[0] = _unit_rows(n=1, seed=2)[0]
    # Loose abs tolerance, so only the cosine check can catch it.
    with pytest.raises(SystemExit, match="min cosine"):
        check_parity(reference, candidate, max_abs_diff=1.0, min_cosine=0.9999)


def test_parity_gate_rejects_nan_and_shape_mismatch():
    reference = _unit_rows()
    candidate = reference.copy()
    candidate[5, 5] = np.nan
    with pytest.raises(SystemExit):
        check_parity(reference, candidate)
    with pytest.raises(SystemExit, match="shapes"):
        check_parity(reference, reference[:10])


def test_int8_gate_rejects_mean_cosine_below_gate():
    fp32 = _unit_rows()
    noisy = fp32 + 0.2 * _unit_rows(seed=3)
    with pytest.raises(SystemExit, match="int8 gate failed"):
        check_int8(fp32, noisy, gate_mean_cosine=0.985)
    assert check_int8(fp32, fp32)["mean_cosine"] == pytest.approx(1.0)


def test_new_version_never_overwrites(tmp_path):
    with modelrepo.new_version(tmp_path, "encoder") as (tmp, version):
        (tmp / "model.onnx").write_text("first")
        modelrepo.write_meta(tmp, {"version": version})
    assert version == 1
    with modelrepo.new_version(tmp_path, "encoder") as (tmp, version):
        (tmp / "model.onnx").write_text("second")
        modelrepo.write_meta(tmp, {"version": version})
    assert version == 2
    assert (tmp_path / "encoder" / "1" / "model.onnx").read_text() == "first"

    # Another writer takes the same number while this one is writing: the rename must fail.
    with pytest.raises(OSError):
        with modelrepo.new_version(tmp_path, "encoder") as (tmp, version):
            (tmp / "model.onnx").write_text("late")
            taken = tmp_path / "encoder" / str(version)
            taken.mkdir()
            (taken / "model.onnx").write_text("other writer")
    assert (taken / "model.onnx").read_text() == "other writer"
    assert modelrepo.versions(tmp_path, "encoder") == [1, 2]
    assert not [p for p in (tmp_path / "encoder").iterdir() if ".tmp-" in p.name]


def test_max_sequence_tokens_prefers_sentence_bert_config_capped_by_positions(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 10**30}))
    assert max_sequence_tokens(tmp_path) == 512
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    assert max_sequence_tokens(tmp_path) == 256
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 4096}))
    assert max_sequence_tokens(tmp_path) == 512
