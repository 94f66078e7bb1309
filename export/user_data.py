"""Event sequences, the train / validation / test split, the user tower's validation windows,
the untrained baselines' user vectors and item popularity (metrics: export/metrics.py).

Torch-free (numpy only): the ranker and the offline evaluation reuse the same split and
sequences.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass

import numpy as np

from dataio import action_and_weight, iter_events, to_event
from recmodel.pooling import DEFAULT_ACTION_WEIGHT, baseline_user_vec, rank_ages

# The user's most recent events, across platforms, the model sees (newest last).
MAX_EVENTS = 50
# Validation users: a fixed, seeded fraction of the users, held out from training entirely.
VAL_FRACTION = 0.10
SPLIT_SEED = 0
UNKNOWN_PLATFORM = "<other>"
HISTORY, HELDOUT_TARGET = "history", "heldout_target"
# The two split rules (split_sequences): data that marks its own held-out targets (rows with
# role=heldout_target, the URLLM copy) is split by user; any other data leave-one-out by time.
SPLIT_USERS, SPLIT_LAST = "users", "last"
SPLIT_RULES = {
    SPLIT_USERS: "split_users: a seeded VAL_FRACTION of the sorted user ids is held out whole "
                 "(random.Random(SPLIT_SEED).sample); training sees every other user's rows; "
                 "the held-out users' role=heldout_target rows are their targets",
    SPLIT_LAST: "leave-one-out by time: per user (events ordered by time, ties as fusion "
                "orders them), the last event is the test target and the one before it the "
                "validation target, each given every earlier event; training sees each "
                "user's events before both (users with under 3 events: all of them)",
}


@dataclass
class UserSeq:
    """One user's events, oldest first. `items` index the catalogue rows (item_vectors order);
    the first `n_history` events have role=history, the rest are held-out targets."""
    user_id: str
    items: np.ndarray      # int64 [T]
    platforms: np.ndarray  # int64 [T], platform vocab ids
    actions: np.ndarray    # int64 [T], Action enum values
    weights: np.ndarray    # float32 [T]
    n_history: int


def _action_and_weight(value: str) -> tuple[int, float]:
    """The one reading of a data row's action column (dataio.action_and_weight: Amazon rows
    say `interact`, MovieLens rows carry the 1..5 star rating), the action's default weight
    filled in."""
    action, weight = action_and_weight(value)
    return action, DEFAULT_ACTION_WEIGHT[action] if weight is None else weight


def load_sequences(dataset: str, ids: list[tuple[str, str]]) -> tuple[list[dict], int]:
    """Per-user raw sequences in the order fusion keeps a profile in, (event_time_ms,
    event_id) of the row as the CLI ingests it (dataio.to_event: seq_index order when the data
    has no times), and how many events were dropped because their item is missing from the
    catalogue `ids`."""
    row_of = {key: i for i, key in enumerate(ids)}
    by_user: dict[str, list] = collections.defaultdict(list)
    missing = 0
    for ev in iter_events(dataset):
        row = row_of.get((ev["platform"], ev["item_id"]))
        if row is None:
            missing += 1
            continue
        event = to_event(ev, {})
        action, weight = _action_and_weight(ev["rating_or_action"])
        by_user[ev["user_id"]].append(((event["event_time_ms"], event["event_id"]), row,
                                       ev["platform"], action, weight, ev.get("role") or HISTORY))
    users = []
    for user_id in sorted(by_user):
        events = sorted(by_user[user_id], key=lambda e: e[0])
        users.append({"user_id": user_id, "events": events})
    return users, missing


def split_users(user_ids: list[str], fraction: float = VAL_FRACTION,
                seed: int = SPLIT_SEED) -> tuple[set[str], set[str]]:
    """(train, validation) user ids: a seeded sample of `fraction` of the sorted ids."""
    ordered = sorted(user_ids)
    val = set(random.Random(seed).sample(ordered, round(fraction * len(ordered))))
    return set(ordered) - val, val


@dataclass
class Split:
    """What training, validation and test see (SPLIT_RULES[rule]). A validation or test
    sequence's targets are its events from n_history on, each given the events before it
    (protocol A: its last event per platform given every earlier one)."""
    rule: str
    vocab: dict[str, int]
    train: list[UserSeq]
    val: list[UserSeq]
    test: list[UserSeq]   # empty where the data withholds its test users (the URLLM copy)


def split_sequences(users: list[dict]) -> Split:
    """load_sequences' users split by the rule their data calls for (SPLIT_RULES)."""
    if any(e[5] == HELDOUT_TARGET for u in users for e in u["events"]):
        train_ids, val_ids = split_users([u["user_id"] for u in users])
        vocab = platform_vocab([u for u in users if u["user_id"] in train_ids])
        seqs = [to_seq(u, vocab) for u in users]
        return Split(SPLIT_USERS, vocab, [s for s in seqs if s.user_id in train_ids],
                     [s for s in seqs if s.user_id in val_ids], [])
    held = [u for u in users if len(u["events"]) >= 3]
    seen = [{"user_id": u["user_id"], "events": u["events"][:-2] if len(u["events"]) >= 3
             else u["events"]} for u in users]
    vocab = platform_vocab(seen)
    train = [to_seq(u, vocab) for u in seen]
    val = [to_seq({"user_id": u["user_id"], "events": u["events"][:-1]}, vocab,
                  len(u["events"]) - 2) for u in held]
    test = [to_seq(u, vocab, len(u["events"]) - 1) for u in held]
    return Split(SPLIT_LAST, vocab, train, val, test)


def platform_vocab(users: list[dict]) -> dict[str, int]:
    """{platform: id}; 0 is any platform the training data does not have."""
    names = sorted({e[2] for u in users for e in u["events"]})
    return {UNKNOWN_PLATFORM: 0, **{name: i + 1 for i, name in enumerate(names)}}


def to_seq(user: dict, vocab: dict[str, int], n_history: int | None = None) -> UserSeq:
    """A load_sequences user as arrays; n_history defaults to the events before the first
    role=heldout_target row (all of them when there is none)."""
    ev = user["events"]
    roles = [e[5] for e in ev]
    if n_history is None:
        n_history = roles.index(HELDOUT_TARGET) if HELDOUT_TARGET in roles else len(ev)
    return UserSeq(user["user_id"],
                   np.array([e[1] for e in ev], dtype=np.int64),
                   np.array([vocab.get(e[2], 0) for e in ev], dtype=np.int64),
                   np.array([e[3] for e in ev], dtype=np.int64),
                   np.array([e[4] for e in ev], dtype=np.float32), n_history)


@dataclass
class Windows:
    """Model inputs for a set of (user, target) queries, left-padded to MAX_EVENTS; the ONNX
    contract's layout (see export/user_tower.py) plus each query's target catalogue row."""
    items: np.ndarray            # int64 [Q, L] catalogue rows (0 on padding)
    platform_ids: np.ndarray     # int64 [Q, L]
    action_ids: np.ndarray       # int64 [Q, L]
    weights: np.ndarray          # float32 [Q, L]
    ages: np.ndarray             # float32 [Q, L]
    mask: np.ndarray             # float32 [Q, L]
    target_platform: np.ndarray  # int64 [Q]
    target_item: np.ndarray      # int64 [Q] catalogue row

    def __len__(self) -> int:
        return len(self.target_item)


def heldout_windows(seqs: list[UserSeq], hide_target_platform: bool,
                    max_events: int = MAX_EVENTS) -> Windows:
    """One query per held-out target of each user: the input is the user's history rows (the
    last `max_events`), without the target platform's events when `hide_target_platform`.
    Targets whose input would be empty are skipped."""
    rows = []
    for s in seqs:
        for t in range(s.n_history, len(s.items)):
            keep = np.arange(s.n_history)
            if hide_target_platform:
                keep = keep[s.platforms[keep] != s.platforms[t]]
            keep = keep[-max_events:]
            if len(keep):
                rows.append((s, keep, t))
    q, L = len(rows), max_events
    w = Windows(np.zeros((q, L), np.int64), np.zeros((q, L), np.int64),
                np.zeros((q, L), np.int64), np.zeros((q, L), np.float32),
                np.zeros((q, L), np.float32), np.zeros((q, L), np.float32),
                np.zeros(q, np.int64), np.zeros(q, np.int64))
    for r, (s, keep, t) in enumerate(rows):
        n = len(keep)
        w.items[r, L - n:] = s.items[keep]
        w.platform_ids[r, L - n:] = s.platforms[keep]
        w.action_ids[r, L - n:] = s.actions[keep]
        w.weights[r, L - n:] = s.weights[keep]
        w.ages[r, L - n:] = rank_ages(n)
        w.mask[r, L - n:] = 1.0
        w.target_platform[r] = s.platforms[t]
        w.target_item[r] = s.items[t]
    return w


def baseline_vectors(w: Windows, item_vecs: np.ndarray) -> np.ndarray:
    """Time-decayed mean pooling (recmodel.pooling) of each window: float32 [Q, dim]."""
    return baseline_user_vec(item_vecs[w.items], w.weights * w.mask, w.ages)


def same_platform_baseline_vectors(w: Windows, item_vecs: np.ndarray) -> np.ndarray:
    """The same pooling over the target platform's events of the window only, falling back to
    the whole window when it has none (the per-platform vector a service would keep)."""
    same = (w.platform_ids == w.target_platform[:, None]).astype(np.float32) * w.mask
    use = np.where(same.sum(1, keepdims=True) > 0, same, w.mask)
    # Ages are re-ranked within the events kept, as a per-platform profile would see them.
    ages = np.flip(np.cumsum(np.flip(use, 1), 1), 1) - use
    return baseline_user_vec(item_vecs[w.items], w.weights * use, ages)


def catalogue_rows(ids: list[tuple[str, str]], vocab: dict[str, int]) -> dict[int, np.ndarray]:
    """{platform id: catalogue rows of that platform} for every platform in `vocab`."""
    out: dict[int, list[int]] = collections.defaultdict(list)
    for row, (platform, _) in enumerate(ids):
        if platform in vocab:
            out[vocab[platform]].append(row)
    return {pid: np.array(rows, dtype=np.int64) for pid, rows in sorted(out.items())}


def item_counts(seqs: list[UserSeq], n_items: int) -> np.ndarray:
    """float64 [n_items]: events of each catalogue row among `seqs`."""
    counts = np.zeros(n_items, dtype=np.float64)
    for s in seqs:
        np.add.at(counts, s.items, 1.0)
    return counts


def popularity(seqs: list[UserSeq], catalogue: dict[int, np.ndarray],
               n_items: int) -> dict[int, np.ndarray]:
    """Event counts of each catalogue row among `seqs`, per platform's catalogue."""
    counts = item_counts(seqs, n_items)
    return {pid: counts[rows] for pid, rows in catalogue.items()}
