"""Offline evaluation (skeleton; filled in below)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from clients.datasets import AMAZON
from services.common.modelrepo import read_meta, resolve

log = logging.getLogger("export.evaluate")

INT8_ENCODER = "encoder_int8"


def int8_cache_path(repo: str | os.PathLike, dataset: str, version: int) -> Path:
    return Path(repo) / "cache" / f"item_vectors-{dataset}-{INT8_ENCODER}-v{version}.npz"


def int8_item_vectors(dataset: str = AMAZON, repo: str | os.PathLike = "models",
                      build: bool = True) -> tuple[list[tuple[str, str]], np.ndarray, int] | None:
    """Catalogue vectors from the int8 encoder (same order and text as export.item_vectors),
    cached beside the fp32 cache; None when absent and `build` is False."""
    from export.item_vectors import _texts_digest, catalogue_texts, embed_texts

    model_dir = resolve(repo, INT8_ENCODER)
    version, meta = int(model_dir.name), read_meta(model_dir)
    ids, texts = catalogue_texts(dataset)
    digest = _texts_digest(ids, texts)
    path = int8_cache_path(repo, dataset, version)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["texts_sha256"]) == digest:
                return ids, z["vecs"].astype(np.float32), version
    if not build:
        return None
    log.info("embedding %d items with %s v%d", len(texts), INT8_ENCODER, version)
    vecs = embed_texts(model_dir, meta, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, vecs=vecs, texts_sha256=np.array(digest), encoder_version=np.array(version))
    os.replace(tmp, path)
    return ids, vecs, version
