"""Dynamic batcher: merges concurrent Embed requests into model calls, fairly.

Each request is cut at submit into chunks of similar-length texts (sorted by padded length)
of at most max_batch_size texts and max_batch_tokens padded tokens. `workers` threads each
take a batch when they are free: the queue's requests in turn, one chunk each per round
(round robin), until the batch is full in texts or padded tokens (the token budget TEI
batches by), after waiting at most max_delay_ms from the oldest queued request for a batch
to fill. So a request of 256 long texts runs as a few dozen chunks that interleave with
other callers' work: it never holds a worker for more than one chunk while others wait, and
with several workers the others keep serving small calls meanwhile.

The queue is bounded in texts: a request that does not fit is refused at once (Overloaded).
A request whose deadline passed while queued is dropped, its remaining chunks never computed
(BudgetSpent). With tracing on, each request's trace gets its queue wait (until its first
chunk ran) and the span of the model calls its chunks rode in (one model call serves many
traces, so each gets its own copy, with the largest batch's size and the chunk count).
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
    """A queued request: its items, chunks not yet taken, deadline (monotonic s, or None)
    and outcome. `costs` are the items' padded token counts. For tracing: the wall-clock
    times (ns) it was queued and its chunks' model calls ran, and the largest batch's size."""

    __slots__ = ("items", "chunks", "left", "taken", "deadline", "queued_at", "done", "result",
                 "error", "abandoned", "queued_ns", "ran_ns", "batch_texts")

    def __init__(self, items: Sequence, costs: Sequence[int], deadline: float | None,
                 max_texts: int, max_tokens: int):
        self.items = items
        self.chunks: collections.deque[tuple[list[int], int]] = collections.deque()
        chunk, tokens = [], 0
        for i in sorted(range(len(items)), key=lambda i: costs[i]):
            if chunk and (len(chunk) >= max_texts or tokens + costs[i] > max_tokens):
                self.chunks.append((chunk, tokens))
                chunk, tokens = [], 0
            chunk.append(i)
            tokens += costs[i]
        if chunk:
            self.chunks.append((chunk, tokens))
        self.left = len(self.chunks)  # chunks not yet finished
        self.taken = 0  # chunks given to a worker so far
        self.deadline = deadline
        self.queued_at = time.monotonic()
        self.done = threading.Event()
        self.result: np.ndarray | None = None
        self.error: Exception | None = None
        self.abandoned = False
        self.queued_ns = time.time_ns()
        self.ran_ns = (0, 0)  # (first chunk's model call began, last chunk's ended)
        self.batch_texts = 0

    def queued_texts(self) -> int:
        return sum(len(idx) for idx, _ in self.chunks)


class DynamicBatcher:
    """Runs `run(items) -> float32 [n, dim]` on merged requests in `workers` threads."""

    def __init__(self, run: Callable[[list], np.ndarray], max_batch_size: int = 64,
                 max_batch_tokens: int = 8192, max_delay_ms: float = 2.0,
                 max_queue_texts: int = 2048, workers: int = 1):
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue_texts = max_queue_texts
        self._queue: collections.deque[Pending] = collections.deque()  # with chunks to take
        self._queued_texts = 0
        self._cv = threading.Condition()
        self._closed = False
        self.stats = collections.Counter()
        self.batch_sizes = collections.Counter()
        self._threads = [threading.Thread(target=self._loop, name=f"batcher-{n}", daemon=True)
                         for n in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    def submit(self, items: Sequence, costs: Sequence[int],
               deadline: float | None = None) -> Pending:
        """Queue one request's items (with their padded token counts). Raises Overloaded if
        the queue is full."""
        pending = Pending(items, costs, deadline, self.max_batch_size, self.max_batch_tokens)
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
                           batch_texts=pending.batch_texts, chunks=pending.taken)
        if not done:
            pending.abandoned = True
            raise BudgetSpent("deadline passed while waiting for the embedding batch")
        if pending.error is not None:
            raise pending.error
        return pending.result

    def __call__(self, items: Sequence, costs: Sequence[int],
                 deadline: float | None = None) -> np.ndarray:
        return self.wait(self.submit(items, costs, deadline))

    def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, finish what is queued, stop the workers."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)

    def _drop(self, p: Pending, error: Exception) -> None:
        """Under the lock: end `p` with `error`, its chunks not taken yet never run."""
        self._queued_texts -= p.queued_texts()
        p.chunks.clear()
        if p.error is None:
            p.error = error
        p.done.set()

    def _take_batch(self) -> list[tuple[Pending, list[int]]] | None:
        """A batch of (request, item indices) chunks; None once closed and drained."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            # Wait for more work until the oldest request has waited max_delay, or enough
            # texts are queued to fill a batch.
            flush_at = min(p.queued_at for p in self._queue) + self.max_delay_s
            while (self._queued_texts < self.max_batch_size and not self._closed
                   and (left := flush_at - time.monotonic()) > 0):
                self._cv.wait(left)
            batch, texts, tokens = [], 0, 0
            now = time.monotonic()
            progress = True
            while self._queue and progress:  # rounds: at most one chunk per request each
                progress = False
                keep = []
                # Least served first (chunks taken so far), then oldest: a request queued
                # behind a long one's chunks goes before that request's next chunk.
                for p in sorted(self._queue, key=lambda p: (p.taken, p.queued_at)):
                    if p.error is not None or p.abandoned or (
                            p.deadline is not None and p.deadline <= now):
                        if p.error is None:
                            self.stats["dropped_expired"] += 1
                            metrics.EMBED_DROPPED.labels("deadline").inc()
                        self._drop(p, BudgetSpent("deadline passed while queued for "
                                                  "embedding; the work was dropped"))
                        continue
                    idx, cost = p.chunks[0]
                    if batch and (texts + len(idx) > self.max_batch_size
                                  or tokens + cost > self.max_batch_tokens):
                        keep.append(p)
                        continue
                    p.chunks.popleft()
                    p.taken += 1
                    self._queued_texts -= len(idx)
                    batch.append((p, idx))
                    texts += len(idx)
                    tokens += cost
                    progress = True
                    if p.chunks:
                        keep.append(p)
                self._queue = collections.deque(keep)
            if self._queue:
                self._cv.notify()  # another free worker can start on what is left
            return batch

    def _finish(self, batch: list[tuple[Pending, list[int]]], vectors: np.ndarray | None,
                error: Exception | None, ran_ns: tuple[int, int], texts: int) -> None:
        start = 0
        with self._cv:
            for p, idx in batch:
                p.ran_ns = (p.ran_ns[0] or ran_ns[0], ran_ns[1])
                p.batch_texts = max(p.batch_texts, texts)
                if error is not None:
                    self._drop(p, error)
                    if p in self._queue:
                        self._queue.remove(p)
                    continue
                rows = vectors[start:start + len(idx)]
                start += len(idx)
                if p.error is not None:
                    continue  # dropped meanwhile (deadline, another chunk failed)
                if p.result is None:
                    p.result = np.empty((len(p.items), rows.shape[1]), rows.dtype)
                p.result[idx] = rows
                p.left -= 1
                if p.left == 0:
                    p.done.set()

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            items = [p.items[i] for p, idx in batch for i in idx]
            started = time.perf_counter()
            started_ns = time.time_ns()
            try:
                vectors = self._run(items)
            except Exception as err:  # noqa: BLE001 - reported to every waiting caller
                log.exception("embedding batch failed")
                self._finish(batch, None, err, (started_ns, time.time_ns()), len(items))
                continue
            metrics.EMBED_BATCH_SECONDS.observe(time.perf_counter() - started)
            metrics.EMBED_BATCH_SIZE.observe(len(items))
            with self._cv:
                self.stats["batches"] += 1
                self.stats["texts"] += len(items)
                self.batch_sizes[len(items)] += 1
            self._finish(batch, vectors, None, (started_ns, time.time_ns()), len(items))
