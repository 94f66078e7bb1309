"""The one deadline style of the engines (services/common/deadlines.py)."""

import time

import pytest

from services.common.deadlines import (DOWNSTREAM_BUDGET_SHARE, deadline, downstream_deadline,
                                       time_left)
from services.common.errors import BudgetSpent


def test_no_budget_means_no_deadline_and_no_timeout():
    assert deadline(None) is None and downstream_deadline(None) is None
    assert time_left(None, "the write") is None


def test_a_downstream_deadline_is_the_share_of_the_budget():
    before = time.monotonic()
    end = downstream_deadline(10.0)
    assert before + 10.0 * DOWNSTREAM_BUDGET_SHARE <= end <= deadline(10.0)
    assert 0 < time_left(end, "the write") <= 10.0 * DOWNSTREAM_BUDGET_SHARE


def test_a_spent_budget_names_the_step_it_stops():
    with pytest.raises(BudgetSpent, match="^deadline passed before the catalogue write$"):
        time_left(deadline(0.0), "the catalogue write")
