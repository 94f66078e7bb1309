"""Embedding engine: fast tokenizer + ONNX Runtime session of an exported BERT-family encoder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from services.common.errors import InvalidInput
from services.common.modelrepo import read_meta

log = logging.getLogger("crossrec.embedding")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# A token is rarely longer than this many characters; text beyond max_tokens * this is cut
# before tokenising so a megabyte of text costs no more than a full-length one.
_CHARS_PER_TOKEN_CAP = 16
# Longest/shortest text length allowed within one model call (see run_sorted).
LENGTH_SPREAD = 1.3


def choose_providers(device: str) -> list[str]:
    """ORT providers for `device` ("auto": CUDA when ONNX Runtime has it, else CPU)."""
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


@dataclass(frozen=True)
class Encoded:
    """One tokenised text: token ids (int64, special tokens included) and whether it was cut."""
    ids: np.ndarray
    truncated: bool


class EmbeddingEngine:
    """Texts to L2-normalised float32 vectors.

    `model_dir` is a version directory of the model repository (model.onnx, meta.json,
    tokenizer.json). Thread-safe: ORT sessions may be run from several threads.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto",
                 intra_op_threads: int = 0, max_texts_per_request: int = 256):
        self.model_dir = Path(model_dir)
        self.meta = read_meta(self.model_dir)
        self.name = self.meta["name"]
        self.version = int(self.meta["version"])
        self.dim = int(self.meta["dim"])
        self.max_tokens = int(self.meta["max_sequence_tokens"])
        self.max_texts_per_request = max_texts_per_request
        self.pad_id = int(self.meta.get("pad_token_id", 0))
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / self.meta.get(
            "tokenizer_file", "tokenizer.json")))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_tokens)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        # Spinning threads steal the shared cores from gRPC and numpy between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.model_dir / "model.onnx"), options,
                                            providers=choose_providers(device))
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        log.info("encoder loaded", extra={"fields": {
            "model": self.name, "version": self.version, "provider": self.provider,
            "dim": self.dim, "max_tokens": self.max_tokens, "dir": str(self.model_dir)}})

    def validate(self, texts: list[str]) -> None:
        """Raise InvalidInput unless 1..max_texts_per_request non-empty texts are given."""
        if not texts:
            raise InvalidInput("texts must hold at least 1 text, got 0")
        if len(texts) > self.max_texts_per_request:
            raise InvalidInput(f"texts must hold at most {self.max_texts_per_request} texts, "
                               f"got {len(texts)}")
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidInput(f"texts[{i}] must be non-empty, got an empty or blank text")

    def tokenize(self, texts: list[str]) -> list[Encoded]:
        """Token ids per text, truncated to max_sequence_tokens (special tokens included)."""
        cap = self.max_tokens * _CHARS_PER_TOKEN_CAP
        cut = [len(t) > cap for t in texts]
        encodings = self.tokenizer.encode_batch([t[:cap] for t in texts])
        return [Encoded(np.asarray(e.ids, dtype=np.int64), c or bool(e.overflowing))
                for e, c in zip(encodings, cut)]

    def run(self, batch: list[Encoded]) -> np.ndarray:
        """One forward pass over `batch`, padded to its longest text: float32 [n, dim]."""
        longest = max(len(e.ids) for e in batch)
        ids = np.full((len(batch), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, e in enumerate(batch):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask,
                 "token_type_ids": np.zeros_like(ids)}
        out = self.session.run([self.output_name],
                               {name: feeds[name] for name in self.input_names})[0]
        return out.astype(np.float32, copy=False)

    def run_sorted(self, batch: list[Encoded], max_batch_size: int,
                   max_chunk_tokens: int = 4096) -> np.ndarray:
        """Run any number of texts in chunks of similar length; input order kept.

        Texts are sorted by length and a new chunk starts when the next text is over
        LENGTH_SPREAD times the chunk's shortest, or would push the chunk past
        `max_batch_size` texts or `max_chunk_tokens` padded tokens. Attention cost grows with
        the square of the padded length, so one long title padding a whole batch costs more
        than the batching saves (measured: bench/embedding.py, tests of run_sorted).
        """
        order = sorted(range(len(batch)), key=lambda i: len(batch[i].ids))
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        chunk: list[int] = []
        for i in order:
            n = len(batch[i].ids)
            if chunk and (len(chunk) >= max_batch_size or (len(chunk) + 1) * n > max_chunk_tokens
                          or n > LENGTH_SPREAD * len(batch[chunk[0]].ids)):
                out[chunk] = self.run([batch[j] for j in chunk])
                chunk = []
            chunk.append(i)
        if chunk:
            out[chunk] = self.run([batch[j] for j in chunk])
        return out

    def embed(self, texts: list[str], max_batch_size: int = 64) -> tuple[np.ndarray, list[Encoded]]:
        """Validate, tokenise and embed without the batcher: (float32 [n, dim], encodings)."""
        self.validate(texts)
        encoded = self.tokenize(texts)
        return self.run_sorted(encoded, max_batch_size), encoded

    def warmup(self) -> None:
        """Run a few shapes once so the first real request does not pay for initialisation."""
        for n, words in ((1, 4), (8, 16), (32, 32)):
            self.run(self.tokenize(["warm up " * words] * n))
