"""Evaluation cases: a validation (or test) user's input events, the platform to rank and the
true item, for protocol A (leave-last-out per platform, warm or cold) and protocol B (URLLM's
held-out targets given the history rows); see export/evaluate.py for the protocols."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dataio import AMAZON, AMAZON_ORIGIN_MS, ORDER_STEP_MS, item_texts
from recmodel.events import ACTION_RATE
from export import cli
from export.rank_data import Query, RankData, last_on_platform_queries, load_data, seq_query


@dataclass
class Case:
    """One evaluation query: a user's input events, the platform to rank, the true item."""
    case_id: str          # unique per case (a fresh user id for an end-to-end system)
    protocol: str         # "A" or "B"
    setting: str          # "warm" or "cold"
    user_id: str
    platform: str
    target: str           # item_id on `platform`
    events: list[dict]    # input, BehaviorEvent fields, oldest first
    query: Query       # the same input as catalogue rows (in-process systems)


PARTS = ("val", "test")
_DATA: dict = {}


def default_data(repo: str | os.PathLike | None = None, dataset: str = AMAZON) -> RankData:
    """The evaluation data (item vectors, sequences, split), loaded once per process."""
    repo = str(repo or cli.default_model_repo())
    key = (repo, dataset)
    if key not in _DATA:
        _DATA[key] = load_data(repo, dataset)
    return _DATA[key]


_TEXTS: dict = {}


def _texts(dataset: str) -> dict:
    if dataset not in _TEXTS:
        try:
            _TEXTS[dataset] = item_texts(dataset)
        except FileNotFoundError:  # data built in memory (tests): events carry no text
            _TEXTS[dataset] = {}
    return _TEXTS[dataset]


def held_out_users(data: RankData | None = None, part: str = "val") -> list[str]:
    """The users of the split's validation ("val") or test ("test") sequences, sorted
    (export.user_data.SPLIT_RULES; the URLLM copy has no test users)."""
    return sorted(s.user_id for s in getattr((data or default_data()).split, part))


def validation_users(data: RankData | None = None) -> list[str]:
    """held_out_users(data, "val")."""
    return held_out_users(data, "val")


def _events(data: RankData, q: Query, case_id: str) -> list[dict]:
    texts = _texts(data.dataset)
    out = []
    for i, (row, action, weight) in enumerate(zip(q.rows, q.actions, q.weights)):
        platform, item_id = data.ids[row]
        out.append(dict(event_id=f"{case_id}:{i}", user_id=case_id, platform=platform,
                        action=int(action), item_id=item_id,
                        item_text=texts.get((platform, item_id), ""),
                        event_time_ms=AMAZON_ORIGIN_MS + i * ORDER_STEP_MS,
                        weight=None if int(action) != ACTION_RATE else float(weight)))
    return out


def build_cases(protocol: str, setting: str, users, data: RankData | None = None,
                part: str = "val") -> list[Case]:
    """Cases of `users` (user ids) for protocol "A" (leave-last-out per platform) or "B"
    (URLLM held-out targets given the history rows); setting "warm", or "cold" (every event
    on the target platform removed from the input); `part` "val" or "test": the split's
    sequences they come from. Users without a usable input are skipped."""
    if protocol not in ("A", "B") or setting not in ("warm", "cold") or part not in PARTS:
        raise ValueError(f"protocol must be A or B, setting warm or cold and part val or "
                         f"test, got {protocol!r}, {setting!r}, {part!r}")
    data = data or default_data()
    cold = setting == "cold"
    by_id = {s.user_id: s for s in getattr(data.split, part)}
    tag = setting if part == "val" else f"{setting}-test"
    cases = []
    for user_id in users:
        s = by_id[user_id]
        if protocol == "A":
            queries = last_on_platform_queries(data, s, cold)
        else:
            queries = [q for t in range(s.n_history, len(s.items))
                       if (q := seq_query(data, s, t, cold, end=s.n_history)) is not None]
        for j, q in enumerate(queries):
            case_id = f"eval-{protocol}-{tag}-{user_id}-{j}"
            cases.append(Case(case_id, protocol, setting, user_id, q.target_platform,
                              data.ids[q.target_row][1], _events(data, q, case_id), q))
    return cases

