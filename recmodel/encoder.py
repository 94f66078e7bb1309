"""The encoder's inference: fast tokenizer + ONNX Runtime session of an exported BERT-family
encoder (the one text-to-vector path of serving, training and evaluation)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from recmodel.modelrepo import read_meta
from recmodel.ortsession import ort_session

log = logging.getLogger("crossrec.embedding")

# A token is rarely longer than this many characters; text beyond max_tokens * this is cut
# before tokenising so a megabyte of text costs no more than a full-length one.
_CHARS_PER_TOKEN_CAP = 16
# Every text runs at its own token count rounded up to this multiple (see padded_length), so
# its vector never depends on the other texts of a call. Measured on 2,000 real titles (median
# 19 tokens; ORT 1.32, 1 thread, CPU time) against padding to the longest of each call: offline
# length-sorted batches of 32 ran at 0.92x (multiple of 4: 1.0x, 16: 0.77x), dynamic batches of
# 16 random titles at 0.84x (4: 0.76x, more calls; 16: 0.80x, more padding).
PAD_MULTIPLE = 8
# Names the arithmetic a vector comes from (padding rule, the row minimum of run, ONNX
# Runtime's version): vectors cached offline carry it, so a change here invalidates them.
LAYOUT = f"pad-to-multiple-of-{PAD_MULTIPLE};rows-at-least-max(2,threads);v1"


def embedding_function_id() -> str:
    """What decides a vector's bits besides the model and the text; part of cache keys."""
    return f"{LAYOUT};onnxruntime-{ort.__version__}"


def padded_length(n_tokens: int, max_tokens: int) -> int:
    """Sequence length a text of `n_tokens` tokens runs at: the next multiple of PAD_MULTIPLE,
    at most `max_tokens` (and never below `n_tokens`). A function of the text alone."""
    return max(n_tokens, min(-(-n_tokens // PAD_MULTIPLE) * PAD_MULTIPLE, max_tokens))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Encoded:
    """One tokenised text: token ids (int64, special tokens included) and whether it was cut."""
    ids: np.ndarray
    truncated: bool


class Encoder:
    """Texts to L2-normalised float32 vectors: the one encoder inference of crossrec (the
    embedding service's engine, export.item_vectors and the export parity gate all run it).

    `model_dir` is a version directory of the model repository (model.onnx, meta.json,
    tokenizer.json). Thread-safe: ORT sessions may be run from several threads.

    Batch invariance: a text's vector is a function of the text alone, bit for bit on one CPU
    type and ONNX Runtime version, whatever else shares its call and whatever the thread count
    (tests/unit/test_embedding_engine.py). Two rules give it: each text is padded to a length
    of its own (padded_length), and each call has at least max(2, intra_op_threads) rows (run).
    Not so for a dynamically quantized graph (encoder_int8): its activations are quantized
    with one scale per call, computed over every text of the call, so its vectors move (~1e-2)
    with their batch companions (`batch_invariant` is False).
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto",
                 intra_op_threads: int = 0):
        """`intra_op_threads` 0: one per CPU this process may run on (set explicitly, as run's
        row minimum depends on it)."""
        self.model_dir = Path(model_dir)
        self.meta = read_meta(self.model_dir)
        self.name = self.meta["name"]
        self.version = int(self.meta["version"])
        self.dim = int(self.meta["dim"])
        self.max_tokens = int(self.meta["max_sequence_tokens"])
        self.pad_id = int(self.meta.get("pad_token_id", 0))
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / self.meta.get(
            "tokenizer_file", "tokenizer.json")))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_tokens)

        self.intra_op_threads = intra_op_threads or usable_cpus()
        # ORT's ReduceSum (the mean pooling over the sequence) takes its batched fast path only
        # for at least max(2, intra-op threads) rows; below that it sums in another order and
        # vectors move by ~3e-8. From there up the bits depend neither on the batch size nor on
        # the thread count (measured: ORT 1.32 CPU, 1 to 16 threads); run pads calls to it.
        self.min_rows = max(2, self.intra_op_threads)
        self.session = ort_session(self.model_dir / "model.onnx", self.intra_op_threads, device)
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self.batch_invariant = self.meta.get("quantization", {}).get("method") != "dynamic"
        log.info("encoder loaded", extra={"fields": {
            "model": self.name, "version": self.version, "provider": self.provider,
            "dim": self.dim, "max_tokens": self.max_tokens, "layout": LAYOUT,
            "intra_op_threads": self.intra_op_threads, "batch_invariant": self.batch_invariant,
            "dir": str(self.model_dir)}})

    def tokenize(self, texts: list[str]) -> list[Encoded]:
        """Token ids per text, truncated to max_sequence_tokens (special tokens included)."""
        cap = self.max_tokens * _CHARS_PER_TOKEN_CAP
        cut = [len(t) > cap for t in texts]
        encodings = self.tokenizer.encode_batch([t[:cap] for t in texts])
        return [Encoded(np.asarray(e.ids, dtype=np.int64), c or bool(e.overflowing))
                for e, c in zip(encodings, cut)]

    def padded_length(self, encoded: Encoded) -> int:
        """The sequence length `encoded` runs at (module padded_length at max_sequence_tokens)."""
        return padded_length(len(encoded.ids), self.max_tokens)

    def run(self, batch: list[Encoded]) -> np.ndarray:
        """One forward pass over texts of one padded length: float32 [n, dim], L2-normalised
        (pooling and normalisation are in the graph). ValueError if padded lengths differ.

        A call of fewer than `min_rows` texts is filled up with copies of its first text (whose
        outputs are dropped): below that ORT pools in another summation order (see __init__).
        Cost: a lone title takes ~1.3-1.6x the time of a 1-row call at 2 threads."""
        width = self.padded_length(batch[0])
        if any(self.padded_length(e) != width for e in batch):
            raise ValueError("run takes texts of one padded length; use run_sorted, got "
                             f"{sorted({self.padded_length(e) for e in batch})}")
        rows = batch + [batch[0]] * (self.min_rows - len(batch))
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, e in enumerate(rows):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask,
                 "token_type_ids": np.zeros_like(ids)}
        out = self.session.run([self.output_name],
                               {name: feeds[name] for name in self.input_names})[0]
        return np.ascontiguousarray(out[:len(batch)], dtype=np.float32)

    def run_sorted(self, batch: list[Encoded], max_batch_size: int,
                   max_chunk_tokens: int = 4096) -> np.ndarray:
        """Run any number of texts: float32 [len(batch), dim], input order kept.

        Texts are sorted by length and run in chunks of one padded length (see padded_length),
        a new chunk also starting when the next text would push it past `max_batch_size`
        texts or `max_chunk_tokens` padded tokens. Each vector is the one the text gets alone.
        """
        order = sorted(range(len(batch)), key=lambda i: len(batch[i].ids))
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        chunk: list[int] = []
        width = 0
        for i in order:
            n = self.padded_length(batch[i])
            if chunk and (n != width or len(chunk) >= max_batch_size
                          or (len(chunk) + 1) * n > max_chunk_tokens):
                out[chunk] = self.run([batch[j] for j in chunk])
                chunk = []
            chunk.append(i)
            width = n
        if chunk:
            out[chunk] = self.run([batch[j] for j in chunk])
        return out

    def warmup(self) -> None:
        """Run a few shapes once so the first real request does not pay for initialisation."""
        for n, words in ((1, 4), (8, 16), (32, 32)):
            self.run_sorted(self.tokenize(["warm up " * words] * n), n)
