"""Admission control: a few calls run, a bounded number wait within their budget, the rest are
refused at once."""

import threading
import time

import pytest

from services.common.admission import Admission
from services.common.errors import BudgetSpent, Overloaded


def hold(gate: Admission, started: threading.Event, release: threading.Event):
    with gate.slot(None):
        started.set()
        release.wait(10)


def test_a_call_waits_for_a_free_slot_then_runs():
    gate = Admission("t", 1, 1)
    started, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold, args=(gate, started, release))
    holder.start()
    started.wait(5)
    threading.Timer(0.05, release.set).start()
    began = time.monotonic()
    with gate.slot(5.0):
        waited = time.monotonic() - began
    holder.join(5)
    assert waited >= 0.04


def test_a_full_wait_queue_refuses_at_once():
    gate = Admission("t", 1, 0)
    started, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold, args=(gate, started, release))
    holder.start()
    started.wait(5)
    try:
        with pytest.raises(Overloaded, match="1 calls running and 0 waiting"):
            with gate.slot(5.0):
                pass
    finally:
        release.set()
        holder.join(5)


def test_a_caller_whose_budget_runs_out_while_waiting_is_dropped():
    gate = Admission("t", 1, 4)
    started, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold, args=(gate, started, release))
    holder.start()
    started.wait(5)
    try:
        with pytest.raises(BudgetSpent, match="deadline passed while waiting"):
            with gate.slot(0.05):
                pass
    finally:
        release.set()
        holder.join(5)
    with gate.slot(0.05):  # the slot is free again, and so is the queue
        pass


def test_slots_are_returned_when_the_call_raises():
    gate = Admission("t", 1, 0)
    with pytest.raises(ValueError):
        with gate.slot(None):
            raise ValueError("engine error")
    with gate.slot(None):
        pass
