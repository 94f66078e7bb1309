"""Encoder export: the published meta.json contract, the parity gates (run on the serving engine),
never-overwrite versions, and offline item vectors that are the served ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from export import item_vectors
from export.encoder import (FP32_NAME, INT8_GATE_MEAN_COSINE, PARITY_MAX_ABS_DIFF,
                            PARITY_MIN_COSINE, batch_invariance, check_int8, check_parity,
                            serving_vectors, stage_version, staged_files)
from export.encoder_reference import TorchReference, max_sequence_tokens
from recmodel import modelrepo
from recmodel.ortsession import ort_session
from services.embedding.engine import EmbeddingEngine

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
    session = ort_session(model_dir / "model.onnx", 1)
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


@pytest.fixture(scope="module")
def serving(encoder_dir):
    return EmbeddingEngine(encoder_dir, device="cpu", max_texts_per_request=128)


def test_parity_gate_passes_on_the_serving_engine_against_torch(encoder_dir, serving, titles):
    # What export_encoder gates on: torch eager vs the vectors the server computes.
    reference = TorchReference(modelrepo.read_meta(encoder_dir)["source_model"]["path"])
    got = serving_vectors(serving, titles)
    figures = check_parity(reference(titles), got)
    assert figures["max_abs_diff"] <= PARITY_MAX_ABS_DIFF
    assert batch_invariance(serving, titles[:16], got) == 0.0


def test_a_staged_version_gives_the_published_vectors(tmp_path, encoder_dir, serving, titles):
    meta = modelrepo.read_meta(encoder_dir)
    base = {k: v for k, v in meta.items() if k not in ("name", "version", "parity")}
    (tmp_path / "model.onnx").symlink_to((encoder_dir / "model.onnx").resolve())
    source = Path(meta["source_model"]["path"])
    stage_version(source, tmp_path, FP32_NAME, base, meta["max_sequence_tokens"])
    assert "meta.json" not in staged_files(tmp_path) and "tokenizer.json" in staged_files(tmp_path)
    staged = EmbeddingEngine(tmp_path, device="cpu")
    assert np.array_equal(serving_vectors(staged, titles), serving_vectors(serving, titles))


def test_offline_item_vectors_are_the_served_vectors(encoder_dir, serving, titles):
    texts = titles + [f"{t} ; {titles[-1 - i]}" for i, t in enumerate(titles[:40])] + ["x"]
    served, _ = serving.embed(texts)
    meta = modelrepo.read_meta(encoder_dir)
    assert np.array_equal(item_vectors.embed_texts(encoder_dir, meta, texts), served)
    assert np.array_equal(item_vectors.embed_texts(encoder_dir, meta, texts, batch_size=5),
                          served)


def test_embed_texts_refuses_the_meta_of_another_model(encoder_dir, model_repo):
    other = modelrepo.read_meta(modelrepo.resolve(model_repo, "encoder_int8"))
    with pytest.raises(ValueError, match="encoder_int8"):
        item_vectors.embed_texts(encoder_dir, other, ["a title"])


def test_item_vector_cache_is_rebuilt_when_the_embedding_function_changes(
        tmp_path, monkeypatch, encoder_dir):
    data = tmp_path / "data" / "tiny"
    data.mkdir(parents=True)
    (data / "items.csv").write_text("item_id,platform,title,category\n"
                                    "1,office,red stapler,office supplies\n"
                                    "2,arts,acrylic paint set 12 colours,paint\n"
                                    "3,arts,sewing needles,\n")
    monkeypatch.setenv("CROSSREC_DATA_DIR", str(tmp_path / "data"))
    repo = tmp_path / "models"
    (repo / "encoder").mkdir(parents=True)
    (repo / "encoder" / encoder_dir.name).symlink_to(encoder_dir.resolve())
    calls = []
    embed = item_vectors.embed_texts
    monkeypatch.setattr(item_vectors, "embed_texts",
                        lambda *a, **k: calls.append(a[2]) or embed(*a, **k))

    ids, first = item_vectors.item_vectors("tiny", repo)
    again = item_vectors.item_vectors("tiny", repo)[1]
    assert len(calls) == 1 and np.array_equal(first, again)
    monkeypatch.setattr(item_vectors, "embedding_function_id", lambda: "another padding rule")
    item_vectors.item_vectors("tiny", repo)
    assert len(calls) == 2 and ids == [("office", "1"), ("arts", "2"), ("arts", "3")]
