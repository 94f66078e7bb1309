"""EmbeddingEngine on the real exported encoder and real titles."""

import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.embedding.engine import CPU, EmbeddingEngine, choose_providers


@pytest.fixture(scope="module")
def engine(encoder_dir):
    return EmbeddingEngine(encoder_dir, device="cpu", max_texts_per_request=16)


def test_vectors_are_unit_length_float32_of_model_dim(engine, titles):
    vectors, encoded = engine.embed(titles[:16])
    assert vectors.shape == (16, engine.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert all(len(e.ids) > 2 and not e.truncated for e in encoded)


def test_padding_to_longest_in_batch_does_not_change_a_vector(engine, titles):
    alone = engine.run(engine.tokenize([titles[0]]))
    padded = engine.run(engine.tokenize([titles[0], titles[1] + " " + titles[2] * 3]))
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)


def test_run_sorted_keeps_input_order(engine, titles):
    encoded = engine.tokenize(titles[:10])
    together = engine.run_sorted(encoded, max_batch_size=3)
    one_by_one = np.vstack([engine.run([e]) for e in encoded])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


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
    (["ok", "  "], "texts[1] must be non-empty"),
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


def test_run_sorted_splits_by_length_so_a_long_text_does_not_pad_the_rest(engine, titles):
    calls = []
    run = engine.run
    engine.run = lambda batch: calls.append([len(e.ids) for e in batch]) or run(batch)
    try:
        encoded = engine.tokenize(titles[:20] + ["long " * 200])
        out = engine.run_sorted(encoded, max_batch_size=64)
    finally:
        engine.run = run
    assert out.shape == (21, engine.dim)
    assert all(max(c) <= 1.3 * min(c) for c in calls)
    assert [202] in calls  # the long text ran alone
