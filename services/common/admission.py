"""Admission control for CPU-bound handlers: at most N engine calls run at once, a bounded
number wait their turn (each no longer than its caller's budget), the rest are refused at once.

Why: a Python server's engine work holds the GIL, so it runs on about one core whatever the
thread count. More calls in flight than the core can overlap only add GIL hand-offs and cache
misses: the ranking engine's CPU per Recommend rose from 13 to 19 ms between 4 and 32
concurrent callers and its throughput fell by a quarter; past capacity, work piled up until
callers' deadlines expired and most of the core went to answers nobody waited for any more.
A slot bounds that; a full wait queue answers RESOURCE_EXHAUSTED in microseconds, which a
client or load balancer can act on.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from services.common import metrics
from services.common.errors import BudgetSpent, Overloaded


class Admission:
    """`active` calls at once, up to `waiting` more queued (roughly first come, first served).

    `slot(budget_s)` is a context manager: it returns once the call may run, raises
    Overloaded when `waiting` calls already wait, BudgetSpent when `budget_s` (None:
    unbounded) passes while waiting.
    """

    def __init__(self, name: str, active: int, waiting: int):
        if active < 1 or waiting < 0:
            raise ValueError(f"admission needs active >= 1 and waiting >= 0, got {active}, "
                             f"{waiting}")
        self.name, self.active, self.waiting = name, active, waiting
        self._slots = threading.Semaphore(active)
        self._lock = threading.Lock()
        self._queued = 0
        self._gauge = metrics.ADMISSION_WAITING.labels(name)
        self._refused = metrics.ADMISSION_REFUSED.labels(name, "queue_full")
        self._expired = metrics.ADMISSION_REFUSED.labels(name, "deadline")

    @contextmanager
    def slot(self, budget_s: float | None):
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if self._queued >= self.waiting:
                    self._refused.inc()
                    raise Overloaded(f"{self.name}: {self.active} calls running and "
                                     f"{self.waiting} waiting; retry with backoff")
                self._queued += 1
                self._gauge.set(self._queued)
            try:
                admitted = self._slots.acquire(timeout=None if budget_s is None
                                               else max(budget_s, 0.0))
            finally:
                with self._lock:
                    self._queued -= 1
                    self._gauge.set(self._queued)
            if not admitted:
                self._expired.inc()
                raise BudgetSpent(f"{self.name}: deadline passed while waiting for one of "
                                  f"{self.active} slots")
        try:
            yield
        finally:
            self._slots.release()
