"""A call's budget as deadlines, the one style of both engines: a deadline is taken when the
budget starts (monotonic seconds, None: no budget), and each step asks `time_left` for its
timeout, which names the step once nothing is left."""

from __future__ import annotations

import time

from services.common.errors import BudgetSpent

# Share of a caller's remaining budget an engine gives its downstream calls (store, embedding,
# fusion), so that a hung dependency is reported by name before the caller's own deadline fires.
DOWNSTREAM_BUDGET_SHARE = 0.8


def deadline(budget_s: float | None, share: float = 1.0) -> float | None:
    """Monotonic time at which `share` of a budget of `budget_s` seconds from now is spent."""
    return None if budget_s is None else time.monotonic() + budget_s * share


def downstream_deadline(budget_s: float | None) -> float | None:
    """Monotonic time by which downstream calls must be done: DOWNSTREAM_BUDGET_SHARE of the
    caller's budget from now. None: no budget."""
    return deadline(budget_s, DOWNSTREAM_BUDGET_SHARE)


def time_left(deadline: float | None, before: str) -> float | None:
    """Seconds to `deadline` (None: unbounded); BudgetSpent naming the step if none are left."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise BudgetSpent(f"deadline passed before {before}")
    return left
