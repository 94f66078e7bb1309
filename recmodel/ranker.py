"""The ranker: the `Ranker` interface the ranking pipeline, serving and evaluation use, the
trained ranker (models/ranker/<N>/, see export/ranker.py) run by ONNX Runtime, and the
retrieval order kept when there is none."""

from __future__ import annotations

import abc
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from recmodel.modelrepo import read_served_meta
from recmodel.ortsession import ort_session
from recmodel.covisit import CoVisits
from recmodel.features import FEATURES

log = logging.getLogger("crossrec.ranking")

# Every key export/ranker.py writes into meta.json is read by serving (SERVED, in
# OnnxRanker below) or is a record for people (INFORMATIONAL); tests/unit/test_model_meta.py
# fails on a key that is neither, so nothing export decides is silently ignored here.
SERVED = ("name", "version", "features", "candidates", "covisit_candidates", "covisit_file",
          "history_events", "model_file", "input_names", "output_names", "retrieval_file")
INFORMATIONAL = ("format", "opset", "inputs", "outputs", "n_features", "candidate_rule",
                 "feature_function", "score", "dataset", "user_tower", "encoder", "popularity",
                 "covisit", "split", "examples", "seed", "train_config", "n_params", "training",
                 "history_window", "created_at", "exporter", "parity", "validation")


class Ranker(Protocol):
    """Scores one candidate list from its features; says how many candidates it wants and
    what else serving needs of it. OnnxRanker and RetrievalOrder subclass it."""

    name: str
    version: int  # 0: no trained model
    meta: dict[str, Any]  # its meta.json ({}: none)
    candidates: int  # nearest-neighbour candidates scored per request
    covisit_candidates: int  # of them, at most this many taken from co-visit counts
    history_events: int  # the user's newest events its features read (what fusion is asked)
    covisit: CoVisits | None  # the co-visit counts it was trained with; None: none
    projection: np.ndarray | None  # float32 [dim, r] retrieval projection (index pca); None
    explains: bool  # its scores follow the features, so attributing them means something

    @abc.abstractmethod
    def score(self, features: np.ndarray) -> np.ndarray:
        """float32 [N] scores of one candidate list's features float32 [N, F], higher
        better."""


class OnnxRanker(Ranker):
    """Scores candidates from their features: float32 [N, F] -> float32 [N], higher better."""

    explains = True

    def __init__(self, model_dir: str | os.PathLike, intra_op_threads: int = 1):
        self.model_dir = Path(model_dir)
        self.meta = read_served_meta(self.model_dir, SERVED, "python -m export.ranker")
        self.name, self.version = self.meta["name"], int(self.meta["version"])
        if tuple(self.meta["features"]) != FEATURES:
            raise ValueError(f"ranker {self.model_dir} was trained on features "
                             f"{self.meta['features']}, serving computes {list(FEATURES)}; "
                             "export a new version: python -m export.ranker")
        self.candidates = int(self.meta["candidates"])
        self.covisit_candidates = int(self.meta["covisit_candidates"])
        # The history window the ranker's features were computed over: the newest events.
        self.history_events = int(self.meta["history_events"])
        self.input_name, = self.meta["input_names"]
        self.output_name, = self.meta["output_names"]
        covisit_file = self.meta["covisit_file"]
        # The co-visit counts the ranker was trained with (features and candidates).
        self.covisit = CoVisits.load(self.model_dir / covisit_file) if covisit_file else None
        if self.covisit is None and any(f.startswith("covisit") for f in FEATURES):
            raise ValueError(f"ranker {self.model_dir} has no co-visit counts (covisit_file "
                             "in meta.json)")
        self.session = ort_session(self.model_dir / self.meta["model_file"], intra_op_threads)
        # The item vectors' principal directions (index kind pca), float32 [dim, r].
        with np.load(self.model_dir / self.meta["retrieval_file"]) as z:
            self.projection = np.ascontiguousarray(z["projection"], dtype=np.float32)
        log.info("ranker loaded", extra={"fields": {"model": self.name, "version": self.version}})

    def score(self, features: np.ndarray) -> np.ndarray:
        """float32 [N] scores of one candidate list's features float32 [N, F]."""
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(
            features[None], dtype=np.float32)})[0]
        return out[0]


class RetrievalOrder(Ranker):
    """No trained ranker (--allow-no-ranker): keep the retrieval order."""

    name, version, candidates = "retrieval_order", 0, 200
    meta: dict[str, Any] = {}  # no meta.json; read only
    explains = False  # its score is the row's position: no feature to attribute it to
    covisit, covisit_candidates, history_events, projection = None, 0, 50, None

    def score(self, features: np.ndarray) -> np.ndarray:
        """The candidates' positions, negated: the first scores highest."""
        return -np.arange(len(features), dtype=np.float32)
