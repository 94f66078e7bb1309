"""EmbeddingEngine on the real exported encoder and real titles."""

import numpy as np
import pytest

from services.common.errors import InvalidInput
from recmodel.ortsession import CPU, choose_providers
from recmodel.encoder import padded_length
from services.embedding.engine import EmbeddingEngine


@pytest.fixture(scope="module")
def engine(encoder_dir):
    return EmbeddingEngine(encoder_dir, device="cpu", max_texts_per_request=16)


def test_vectors_are_unit_length_float32_of_model_dim(engine, titles):
    vectors, encoded = engine.embed(titles[:16])
    assert vectors.shape == (16, engine.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert all(len(e.ids) > 2 and not e.truncated for e in encoded)


def test_a_text_gets_the_same_bits_alone_and_in_any_batch(engine, encoder_dir, titles):
    # Companions of every length, several batch sizes and thread counts: each must give the
    # vector the text gets alone, bit for bit (offline vectors are the served ones).
    texts = titles[:40] + [titles[1] + " " + titles[2] * 3, "long " * 150, "ab"]
    encoded = engine.tokenize(texts)
    alone = np.vstack([engine.run_sorted([e], 1) for e in encoded])
    rng = np.random.default_rng(0)
    for max_batch_size in (2, 3, 5, 8, 16, 64):
        pick = rng.permutation(len(texts))[:rng.integers(2, len(texts))]
        together = engine.run_sorted([encoded[i] for i in pick], max_batch_size)
        assert np.array_equal(together, alone[pick]), max_batch_size
    vectors, _ = engine.embed(texts[:16])
    assert np.array_equal(vectors, alone[:16])
    for threads in (1, 3):
        other = EmbeddingEngine(encoder_dir, device="cpu", intra_op_threads=threads)
        assert np.array_equal(other.run_sorted(encoded, 7), alone), threads


def test_run_sorted_keeps_input_order(engine, titles):
    encoded = engine.tokenize(titles[:10])
    together = engine.run_sorted(encoded, max_batch_size=3)
    one_by_one = np.vstack([engine.run([e]) for e in encoded])
    assert np.array_equal(together, one_by_one)


def test_padded_length_is_the_next_multiple_of_8_within_the_model_limit():
    assert [padded_length(n, 256) for n in (1, 8, 9, 16, 17, 250, 256)] == [
        8, 8, 16, 16, 24, 256, 256]
    assert padded_length(509, 510) == 510 and padded_length(510, 510) == 510


def test_run_refuses_texts_of_different_padded_lengths(engine):
    encoded = engine.tokenize(["short", "a much longer title " * 4])
    with pytest.raises(ValueError, match="one padded length"):
        engine.run(encoded)


def test_similar_titles_are_closer_than_unrelated_ones(engine):
    v, _ = engine.embed(["red acrylic paint set 12 colors", "acrylic paint 24 colours",
                         "stapler heavy duty office"])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_long_text_is_truncated_and_reported(engine):
    _, encoded = engine.embed(["word " * 5000, "short title"])
    assert encoded[0].truncated and len(encoded[0].ids) == engine.max_tokens
    assert not encoded[1].truncated


def test_a_megabyte_of_text_is_cut_before_tokenising(engine):
    _, encoded = engine.embed(["x" * 1_000_000])
    assert encoded[0].truncated and len(encoded[0].ids) <= engine.max_tokens


@pytest.mark.parametrize("texts, message", [
    ([], "texts must hold at least 1 text, got 0"),
    (["ok", "  "], "texts[1] must hold a visible character"),
    (["t"] * 17, "texts must hold at most 16 texts, got 17"),
])
def test_bad_input_is_rejected_naming_field_and_limit(engine, texts, message):
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        engine.embed(texts)


def test_cpu_device_uses_the_cpu_provider(engine):
    assert choose_providers("cpu") == [CPU]
    assert engine.provider == CPU


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device must be"):
        choose_providers("tpu")


def test_run_sorted_runs_padded_lengths_apart_so_a_long_text_pads_no_other(engine, titles):
    calls = []
    run = engine.run
    engine.run = lambda batch: calls.append([len(e.ids) for e in batch]) or run(batch)
    try:
        encoded = engine.tokenize(titles[:20] + ["long " * 200])
        out = engine.run_sorted(encoded, max_batch_size=64)
    finally:
        engine.run = run
    assert out.shape == (21, engine.dim)
    assert all(len({padded_length(n, engine.max_tokens) for n in c}) == 1 for c in calls)
    assert sum(map(len, calls)) == 21
    assert [202] in calls  # the long text ran alone
