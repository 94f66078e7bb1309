"""Embedding engine: the encoder (recmodel.encoder) plus the limits of a request: how many
texts, which texts, how many tokens."""

from __future__ import annotations

import os

import numpy as np

from recmodel.encoder import Encoded, Encoder
from recmodel.text import has_visible_text
from services.common.errors import InvalidInput


class EmbeddingEngine(Encoder):
    """The encoder with the embedding service's request checks (InvalidInput naming the
    field); vectors are the Encoder's, bit for bit."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto",
                 intra_op_threads: int = 0, max_texts_per_request: int = 256,
                 max_request_tokens: int = 65_536):
        super().__init__(model_dir, device, intra_op_threads)
        self.max_texts_per_request = max_texts_per_request
        self.max_request_tokens = max_request_tokens

    def validate(self, texts: list[str]) -> None:
        """Raise InvalidInput unless 1..max_texts_per_request non-empty texts are given."""
        if not texts:
            raise InvalidInput("texts must hold at least 1 text, got 0")
        if len(texts) > self.max_texts_per_request:
            raise InvalidInput(f"texts must hold at most {self.max_texts_per_request} texts, "
                               f"got {len(texts)}")
        for i, text in enumerate(texts):
            if not has_visible_text(text):
                raise InvalidInput(f"texts[{i}] must hold a visible character, got an empty "
                                   "text or only whitespace, control or zero-width characters")

    def request_tokens(self, encoded: list[Encoded]) -> list[int]:
        """Each text's padded token count (what it costs a model call); InvalidInput when
        their sum passes max_request_tokens."""
        costs = [self.padded_length(e) for e in encoded]
        if sum(costs) > self.max_request_tokens:
            raise InvalidInput(
                f"texts hold {sum(costs)} padded tokens after tokenisation; at most "
                f"{self.max_request_tokens} per request (--max-request-tokens): send them "
                "in several requests")
        return costs

    def embed(self, texts: list[str], max_batch_size: int = 64) -> tuple[np.ndarray, list[Encoded]]:
        """Validate, tokenise and embed without the batcher: (float32 [n, dim], encodings)."""
        self.validate(texts)
        encoded = self.tokenize(texts)
        return self.run_sorted(encoded, max_batch_size), encoded
