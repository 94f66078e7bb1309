"""Torch-free user-vector pieces shared by export and the fusion service: the untrained
time-decayed mean pooling baseline and the event-feature conventions of the user tower.

Conventions (the user tower ONNX model is trained on exactly these; see export/user_tower.py):

- An event window is a user's most recent events across platforms, oldest first, newest last.
- `ages[i]` is the event's rank from the newest event *of the window fed*, in events: 0 for the
  newest, 1 for the one before, ... (so for n real events, ages = n-1, ..., 1, 0). It is a
  float so that a time-based age can replace it later; the trained model only knows ranks.
- `weights[i]` is `BehaviorEvent.weight` when set, else `DEFAULT_ACTION_WEIGHT[action]`; for
  ACTION_RATE it is the rating on the 1..5 scale. Weights are a multiplicative prior on how
  much an event counts, in the baseline and in the model's attention alike.
"""

from __future__ import annotations

import numpy as np

# The Action enum's names and numbers (index = number, from the generated protobuf module)
# and the default weights are recmodel.events'; the model's conventions are read here.
from recmodel.events import (  # noqa: F401 - re-exported for export/ and user_model.py
    ACTION_INTERACT, ACTION_NAMES, ACTION_RATE, DEFAULT_WEIGHT)

# Weight of an event whose BehaviorEvent.weight is unset, by Action number (one table for
# ingest validation, the baseline and the model's features).
DEFAULT_ACTION_WEIGHT = DEFAULT_WEIGHT

# Recency half-life of the baseline, in events: an event 10 events older counts half as much.
HALF_LIFE_EVENTS = 10.0


def rank_ages(n: int) -> np.ndarray:
    """float32 [n] ages of a window of `n` events ordered oldest first: n-1, ..., 1, 0."""
    return np.arange(n - 1, -1, -1, dtype=np.float32)


def baseline_user_vec(item_vecs: np.ndarray, weights: np.ndarray, ages: np.ndarray,
                      half_life: float = HALF_LIFE_EVENTS) -> np.ndarray:
    """Time-decayed mean pooling: L2norm(sum_i weights_i * 0.5 ** (ages_i / half_life) * v_i).

    item_vecs float [..., n, dim] (L2-normalised item text vectors), weights [..., n] (0 for
    padding: a zero weight drops the event), ages [..., n] in the unit of `half_life` (events).
    Returns float32 [..., dim], L2-normalised; all zeros where no event has a positive weight
    (an unknown user has no vector).
    """
    item_vecs = np.asarray(item_vecs, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32) * np.exp2(
        -np.asarray(ages, dtype=np.float32) / np.float32(half_life))
    pooled = np.einsum("...n,...nd->...d", w, item_vecs)
    norm = np.linalg.norm(pooled, axis=-1, keepdims=True)
    return np.where(norm > 0, pooled / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
