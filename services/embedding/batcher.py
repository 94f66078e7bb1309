"""Dynamic batcher: merges concurrent Embed requests into one model call.

A batch is dispatched when it holds max_batch_size texts, when adding the next request would
pass max_batch_tokens padded tokens, or max_delay_ms after its oldest request was queued.
The queue is bounded in texts: a request that does not fit is refused at once (Overloaded).
A request whose deadline passed while queued is dropped, never computed (BudgetSpent).
With tracing on, each request's trace gets its queue wait and the run of the batch it rode in
(one model call serves many traces, so each gets its own copy of that span, with the batch's
size).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np

from services.common import metrics, tracing
from services.common.errors import BudgetSpent, NotReady, Overloaded

log = logging.getLogger("crossrec.embedding")


class Pending:
    """A queued request: its encodings, deadline (monotonic s, or None) and outcome; the
    wall-clock times (ns) it was queued and its batch ran, and that batch's size, for tracing."""

    __slots__ = ("items", "cost_len", "deadline", "queued_at", "done", "result", "error",
                 "abandoned", "queued_ns", "ran_ns", "batch_texts")

    def __init__(self, items: Sequence, lengths: Sequence[int], deadline: float | None):
        self.items = items
        self.cost_len = max(lengths)
        self.deadline = deadline
        self.queued_at = time.monotonic()
        self.done = threading.Event()
        self.result: np.ndarray | None = None
        self.error: Exception | None = None
        self.abandoned = False
        self.queued_ns = time.time_ns()
        self.ran_ns = (0, 0)
        self.batch_texts = 0


class DynamicBatcher:
    """Runs `run(items) -> float32 [n, dim]` on merged requests in one worker thread."""

    def __init__(self, run: Callable[[list], np.ndarray], max_batch_size: int = 64,
                 max_batch_tokens: int = 8192, max_delay_ms: float = 2.0,
                 max_queue_texts: int = 2048):
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue_texts = max_queue_texts
        self._queue: collections.deque[Pending] = collections.deque()
        self._queued_texts = 0
        self._cv = threading.Condition()
        self._closed = False
        self.stats = collections.Counter()
        self.batch_sizes = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    def submit(self, items: Sequence, lengths: Sequence[int],
               deadline: float | None = None) -> Pending:
        """Queue one request's items (with their token lengths). Raises Overloaded if full."""
        pending = Pending(items, lengths, deadline)
        with self._cv:
            if self._closed:
                raise NotReady("embedding batcher is shutting down")
            if self._queued_texts + len(items) > self.max_queue_texts:
                self.stats["rejected_full"] += 1
                metrics.EMBED_DROPPED.labels("queue_full").inc()
                raise Overloaded(f"embedding queue is full ({self._queued_texts} of "
                                 f"{self.max_queue_texts} texts queued); retry with backoff")
            self._queue.append(pending)
            self._queued_texts += len(items)
            self._cv.notify()
        return pending

    def wait(self, pending: Pending) -> np.ndarray:
        """Block until `pending` ran or its deadline passed; float32 [n, dim]."""
        timeout = (None if pending.deadline is None
                   else max(0.0, pending.deadline - time.monotonic()))
        done = pending.done.wait(timeout)
        run_start, run_end = pending.ran_ns
        tracing.record("embedding.queue_wait", pending.queued_ns, run_start or time.time_ns(),
                       texts=len(pending.items))
        if run_start:
            tracing.record("embedding.batch", run_start, run_end,
                           batch_texts=pending.batch_texts)
        if not done:
            pending.abandoned = True
            raise BudgetSpent("deadline passed while waiting for the embedding batch")
        if pending.error is not None:
            raise pending.error
        return pending.result

    def __call__(self, items: Sequence, lengths: Sequence[int],
                 deadline: float | None = None) -> np.ndarray:
        return self.wait(self.submit(items, lengths, deadline))

    def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, finish what is queued, stop the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout_s)

    def _take_batch(self) -> list[Pending] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            # Wait for more work until the oldest request has waited max_delay, or enough
            # texts are queued to fill a batch.
            flush_at = self._queue[0].queued_at + self.max_delay_s
            while (self._queued_texts < self.max_batch_size and not self._closed
                   and (left := flush_at - time.monotonic()) > 0):
                self._cv.wait(left)
            batch, texts, longest = [], 0, 0
            now = time.monotonic()
            while self._queue:
                head = self._queue[0]
                if head.abandoned or (head.deadline is not None and head.deadline <= now):
                    self._queue.popleft()
                    self._queued_texts -= len(head.items)
                    head.error = BudgetSpent("deadline passed while queued for embedding; "
                                             "the work was dropped")
                    head.done.set()
                    self.stats["dropped_expired"] += 1
                    metrics.EMBED_DROPPED.labels("deadline").inc()
                    continue
                n = len(head.items)
                padded = (texts + n) * max(longest, head.cost_len)
                if batch and (texts + n > self.max_batch_size or padded > self.max_batch_tokens):
                    break
                self._queue.popleft()
                self._queued_texts -= n
                batch.append(head)
                texts += n
                longest = max(longest, head.cost_len)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            items = [item for p in batch for item in p.items]
            started = time.perf_counter()
            started_ns = time.time_ns()
            try:
                vectors = self._run(items)
            except Exception as err:  # noqa: BLE001 - reported to every waiting caller
                log.exception("embedding batch failed")
                for p in batch:
                    p.error = err
                    p.done.set()
                continue
            metrics.EMBED_BATCH_SECONDS.observe(time.perf_counter() - started)
            metrics.EMBED_BATCH_SIZE.observe(len(items))
            self.stats["batches"] += 1
            self.stats["texts"] += len(items)
            self.batch_sizes[len(items)] += 1
            ran_ns = (started_ns, time.time_ns())
            start = 0
            for p in batch:
                p.ran_ns, p.batch_texts = ran_ns, len(items)
                p.result = vectors[start:start + len(p.items)]
                start += len(p.items)
                p.done.set()
