"""The trained ranker (models/ranker/<N>/, see export/ranker.py) run by ONNX Runtime."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from services.common.modelrepo import read_meta
from services.ranking.covisit import CoVisits
from services.ranking.features import FEATURES

log = logging.getLogger("crossrec.ranking")


class OnnxRanker:
    """Scores candidates from their features: float32 [N, F] -> float32 [N], higher better."""

    def __init__(self, model_dir: str | os.PathLike, intra_op_threads: int = 1):
        import onnxruntime as ort
        self.model_dir = Path(model_dir)
        self.meta = read_meta(self.model_dir)
        self.name, self.version = self.meta["name"], int(self.meta["version"])
        if tuple(self.meta["features"]) != FEATURES:
            raise ValueError(f"ranker {self.model_dir} was trained on features "
                             f"{self.meta['features']}, serving computes {list(FEATURES)}; "
                             "export a new version: python -m export.ranker")
        self.candidates = int(self.meta.get("candidates", 200))
        self.covisit_candidates = int(self.meta.get("covisit_candidates", 0))
        covisit_file = self.meta.get("covisit_file")
        # The co-visit counts the ranker was trained with (features and candidates).
        self.covisit = CoVisits.load(self.model_dir / covisit_file) if covisit_file else None
        if self.covisit is None and any(f.startswith("covisit") for f in FEATURES):
            raise ValueError(f"ranker {self.model_dir} has no co-visit counts (covisit_file "
                             "in meta.json)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.model_dir / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        log.info("ranker loaded", extra={"fields": {"model": self.name, "version": self.version}})

    def score(self, features: np.ndarray) -> np.ndarray:
        out = self.session.run(["scores"], {"features": features[None].astype(np.float32)})[0]
        return out[0]


class RetrievalOrder:
    """No trained ranker (--allow-no-ranker): keep the retrieval order."""

    name, version, candidates = "retrieval_order", 0, 200
    covisit, covisit_candidates = None, 0

    def score(self, features: np.ndarray) -> np.ndarray:
        return -np.arange(len(features), dtype=np.float32)
