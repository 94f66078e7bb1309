"""User models behind one interface: the trained user tower (ONNX) and the untrained
time-decayed mean pooling baseline. Both map event windows to L2-normalised user vectors in
the item-text vector space, plus each event's weight in that vector (for explanations)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recmodel.events import Event
from recmodel.modelrepo import read_served_meta
from recmodel.ortsession import ort_session
from recmodel.pooling import (ACTION_NAMES, DEFAULT_ACTION_WEIGHT, HALF_LIFE_EVENTS,
                                     baseline_user_vec, rank_ages)

log = logging.getLogger("crossrec.fusion")

# Every key export/user_tower.py writes into meta.json is read by serving (SERVED, in
# OnnxUserModel below) or is a record for people (INFORMATIONAL); tests/unit/test_model_meta.py
# fails on a key that is neither.
SERVED = ("name", "version", "max_events", "dim", "platform_vocab", "unknown_platform_id",
          "action_vocab", "default_action_weight", "model_file", "input_names", "output_names")
INFORMATIONAL = ("format", "opset", "inputs", "outputs", "features", "score", "temperature",
                 "actions_seen_in_training", "actions_tied_to_interact", "baseline",
                 "created_at", "dataset", "encoder", "evaluation", "exporter", "metrics",
                 "parity", "seed", "split", "train_config", "training")


@dataclass
class Window:
    """Events oldest first (newest last) and their item vectors float32 [n, dim]."""
    events: list[Event]
    vectors: np.ndarray

    @classmethod
    def of(cls, events: list[Event], vectors: dict) -> "Window":
        dim = len(next(iter(vectors.values())))
        stacked = (np.stack([vectors[(e.platform, e.item_id)] for e in events])
                   if events else np.zeros((0, dim), np.float32))
        return cls(events, stacked.astype(np.float32, copy=False))

    def only(self, platform: str) -> "Window":
        keep = [i for i, e in enumerate(self.events) if e.platform == platform]
        return Window([self.events[i] for i in keep], self.vectors[keep])

    def weights(self) -> np.ndarray:
        return np.asarray([e.weight for e in self.events], dtype=np.float32)


@dataclass
class UserVectors:
    """One user's vectors from one window, float32 [dim] each, L2-normalised."""
    platforms: list[str]                    # the window's platforms, sorted
    fused: np.ndarray                       # the window for no particular platform
    per_platform: dict[str, np.ndarray]     # platform p: the window's events on p, for p
    for_platform: np.ndarray | None         # the window as seen by `for_platform`
    fused_weights: np.ndarray               # float32 [n events]: weights in `fused`
    for_platform_weights: np.ndarray | None


def encode_user(model, window: Window, for_platform: str = "") -> UserVectors:
    """The user-window layout, the one fusion serves and export trains and evaluates on: one
    model call over [the window for "" (fused), the window's events on each platform p for p,
    the window for `for_platform` (when given)]. The same window gives the same vectors on
    every path, bit for bit: same batch, same order, same padding."""
    platforms = sorted({e.platform for e in window.events})
    windows = [window] + [window.only(p) for p in platforms]
    targets = ["", *platforms]
    if for_platform:
        windows.append(window)
        targets.append(for_platform)
    vecs, weights = model.encode(windows, targets)
    return UserVectors(platforms, vecs[0], {p: vecs[1 + j] for j, p in enumerate(platforms)},
                       vecs[-1] if for_platform else None, weights[0],
                       weights[-1] if for_platform else None)


class BaselineUserModel:
    """Untrained time-decayed mean pooling (recmodel/pooling.py); ignores the target."""

    name, version, baseline = "baseline_mean_pooling", 0, True

    def __init__(self, max_events: int = 50):
        self.max_events = max_events

    def encode(self, windows: list[Window], targets: list[str]):
        vecs, weights = [], []
        for w in windows:
            ages = rank_ages(len(w.events))
            vecs.append(baseline_user_vec(w.vectors, w.weights(), ages))
            raw = w.weights() * np.exp2(-ages / np.float32(HALF_LIFE_EVENTS))
            weights.append(raw / max(float(raw.sum()), 1e-12))
        return np.stack(vecs), weights


# Intra-op threads of the fusion service's user-tower session; the offline evaluation runs
# the tower with the same, so no kernel choice can differ from what is served.
SERVED_THREADS = 1


class OnnxUserModel:
    """The trained user tower (models/user_tower/<N>/), run by ONNX Runtime on the CPU."""

    baseline = False

    def __init__(self, model_dir: str | os.PathLike, intra_op_threads: int = SERVED_THREADS):
        self.model_dir = Path(model_dir)
        self.meta = read_served_meta(self.model_dir, SERVED, "python -m export.user_tower")
        self.name = self.meta["name"]
        self.version = int(self.meta["version"])
        self.max_events = int(self.meta["max_events"])
        self.dim = int(self.meta["dim"])
        self.platform_ids: dict[str, int] = self.meta["platform_vocab"]
        self.unknown_platform_id = int(self.meta["unknown_platform_id"])
        # The model embeds Action enum values directly and weighs unset weights by the one
        # table in recmodel/events.py: refuse a model trained on other numbers.
        vocab = {name: int(i) for name, i in self.meta["action_vocab"].items()}
        weights = {ACTION_NAMES[a]: w for a, w in DEFAULT_ACTION_WEIGHT.items()}
        if vocab != {name: a for a, name in enumerate(ACTION_NAMES)} or \
                self.meta["default_action_weight"] != weights:
            raise ValueError(f"user tower {self.model_dir} was trained on other action ids or "
                             "default weights than serving uses; export a new version")
        self.input_names = list(self.meta["input_names"])
        self.output_names = list(self.meta["output_names"])
        self.session = ort_session(self.model_dir / self.meta["model_file"], intra_op_threads)
        log.info("user model loaded", extra={"fields": {
            "model": self.name, "version": self.version, "platforms": self.platform_ids}})

    def platform_id(self, platform: str) -> int:
        """Vocabulary id; unknown_platform_id for "" (no particular platform) and platforms
        unseen in training."""
        return self.platform_ids.get(platform, self.unknown_platform_id)

    def encode(self, windows: list[Window], targets: list[str]):
        batch, length = len(windows), max(1, max(len(w.events) for w in windows))
        item_vecs = np.zeros((batch, length, self.dim), np.float32)
        platform_ids = np.zeros((batch, length), np.int64)
        action_ids = np.zeros((batch, length), np.int64)
        weights = np.zeros((batch, length), np.float32)
        ages = np.zeros((batch, length), np.float32)
        mask = np.zeros((batch, length), np.float32)
        for b, w in enumerate(windows):
            n = len(w.events)
            if not n:
                continue
            at = slice(length - n, length)  # left padding: the newest event is last
            item_vecs[b, at] = w.vectors
            platform_ids[b, at] = [self.platform_id(e.platform) for e in w.events]
            action_ids[b, at] = [e.action for e in w.events]
            weights[b, at] = w.weights()
            ages[b, at] = rank_ages(n)
            mask[b, at] = 1.0
        target = np.asarray([self.platform_id(t) for t in targets], np.int64)
        feeds = {"item_vecs": item_vecs, "platform_ids": platform_ids, "action_ids": action_ids,
                 "weights": weights, "ages": ages, "mask": mask, "target_platform": target}
        vecs, event_weights = self.session.run(self.output_names,
                                               {n: feeds[n] for n in self.input_names})
        return vecs, [event_weights[b, length - len(w.events):] for b, w in enumerate(windows)]
