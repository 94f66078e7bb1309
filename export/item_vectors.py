"""Item text vectors of a whole catalogue from an exported ONNX encoder, cached under models/cache.

The text is `compose_item_text(title, attributes)`, the one the serving side embeds, and the
vectors come from the serving code itself (recmodel.encoder.Encoder on
models/encoder/<N>/), so training and evaluation see, bit for bit, the vectors serving computes.

    python -m export.item_vectors --model-repo models [--dataset amazon-arts-office-urllm]
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataio import AMAZON, dataset_name, read_items
from export import cli
from recmodel.modelrepo import read_meta, resolve
from recmodel.text import compose_item_text
from recmodel.encoder import Encoder, embedding_function_id

log = logging.getLogger("export.item_vectors")

ENCODER_NAME = "encoder"
BATCH_SIZE = 64
# onnxruntime threads: the export machine is small and shared.
THREADS = 2
# Texts per engine call, one progress bar step. fp32 vectors do not depend on it (batch
# invariance); dynamic int8 ones depend on their batch anyway (see Encoder).
PROGRESS_TEXTS = 4096


def encoder_ref(repo: str | os.PathLike, version: int | None = None,
                encoder: str = ENCODER_NAME) -> tuple[Path, int, dict]:
    """(directory, version, meta) of `encoder` at `version` (None: the highest)."""
    model_dir = resolve(repo, encoder, version)
    return model_dir, int(model_dir.name), read_meta(model_dir)


def cache_path(repo: str | os.PathLike, dataset: str, version: int,
               encoder: str = ENCODER_NAME) -> Path:
    name = dataset_name(dataset)
    return Path(repo) / "cache" / f"item_vectors-{name}-{encoder}-v{version}.npz"


def catalogue_texts(dataset: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Every catalogue item as (platform, item_id), in file order, and its item text."""
    ids, texts = [], []
    for row in read_items(dataset):
        ids.append((row["platform"], row["item_id"]))
        texts.append(compose_item_text(row["title"], row["attributes"]))
    return ids, texts


def texts_digest(ids, texts) -> str:
    """Cache key of the vectors of `texts`: the texts, and what decides a vector's bits besides
    the model (padding rule, ONNX Runtime version), so a change to either re-embeds."""
    h = hashlib.sha256()
    h.update(f"{embedding_function_id()}\x1e".encode())
    for (platform, item_id), text in zip(ids, texts):
        h.update(f"{platform}\x1f{item_id}\x1f{text}\x1e".encode())
    return h.hexdigest()


def embed_texts(model_dir: Path, meta: dict, texts: list[str], batch_size: int = BATCH_SIZE
                ) -> np.ndarray:
    """float32 [len(texts), dim], L2-normalised: what the embedding service returns for each
    text (Encoder.tokenize + run_sorted on CPU, `batch_size` texts per model call).
    `meta` is model_dir's meta.json; ValueError if it names another model."""
    engine = Encoder(model_dir, device="cpu", intra_op_threads=THREADS)
    if (meta.get("name"), int(meta["dim"])) != (engine.name, engine.dim):
        raise ValueError(f"meta names {meta.get('name')} dim {meta['dim']}, but {model_dir} "
                         f"holds {engine.name} dim {engine.dim}")
    out = np.empty((len(texts), engine.dim), dtype=np.float32)
    with tqdm(total=len(texts), desc="embedding items", unit="text", disable=None) as bar:
        for b0 in range(0, len(texts), PROGRESS_TEXTS):
            done = min(b0 + PROGRESS_TEXTS, len(texts))
            out[b0:done] = engine.run_sorted(engine.tokenize(texts[b0:done]), batch_size)
            bar.update(done - b0)
    return out


def item_vectors(dataset: str = AMAZON, repo: str | os.PathLike = "models",
                 version: int | None = None, encoder: str = ENCODER_NAME, build: bool = True
                 ) -> tuple[list[tuple[str, str]], np.ndarray] | None:
    """Every catalogue item of `dataset` as (platform, item_id), in items.csv order, and its
    float32 [n, dim] L2-normalised text vector from `encoder` (encoder or encoder_int8) at
    `version` (None: the highest).

    Cached in models/cache/item_vectors-<dataset>-<encoder>-v<N>.npz; the cache is reused only
    when it was built from the same item texts by the same embedding function (texts_digest).
    Without a usable cache and with `build` False: None."""
    model_dir, version, meta = encoder_ref(repo, version, encoder)
    ids, texts = catalogue_texts(dataset)
    digest = texts_digest(ids, texts)
    path = cache_path(repo, dataset, version, encoder)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["texts_sha256"]) == digest and z["vecs"].shape == (len(ids), meta["dim"]):
                log.info("item vectors from cache %s", path)
                return ids, z["vecs"].astype(np.float32)
        if build:
            log.warning("cache %s is stale (item texts or embedding function changed); "
                        "re-embedding", path)
    if not build:
        return None
    log.info("embedding %d %s items with %s v%d", len(texts), dataset, encoder, version)
    vecs = embed_texts(model_dir, meta, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, vecs=vecs, platforms=np.array([p for p, _ in ids]),
             item_ids=np.array([i for _, i in ids]), texts_sha256=np.array(digest),
             encoder_version=np.array(version),
             embedding_function=np.array(embedding_function_id()))
    os.replace(tmp, path)
    return ids, vecs


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--encoder-version", type=int, default=None)
    args = parser.parse_args(argv)
    cli.setup_logging()
    ids, vecs = item_vectors(args.dataset, args.model_repo, args.encoder_version)
    log.info("%d item vectors, dim %d", len(ids), vecs.shape[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
