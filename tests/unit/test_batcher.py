"""DynamicBatcher policy: merging, limits, bounded queue, deadlines, shutdown."""

import threading
import time

import numpy as np
import pytest

from services.common.errors import BudgetSpent, NotReady, Overloaded
from services.embedding.batcher import DynamicBatcher


class Recorder:
    """A run function that returns each item's value as a 1-d vector and records batches."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.gate = gate

    def __call__(self, items):
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(items))
        return np.asarray(items, dtype=np.float32)[:, None]


def submit_concurrently(batcher, requests, deadline=None):
    results, errors = {}, {}

    def call(i, items):
        try:
            results[i] = batcher(items, [1] * len(items), deadline)
        except Exception as err:  # noqa: BLE001
            errors[i] = err
    threads = [threading.Thread(target=call, args=(i, r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results, errors


def test_concurrent_requests_share_batches_and_get_their_own_results():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=64, max_delay_ms=50)
    results, errors = submit_concurrently(batcher, [[i] for i in range(16)])
    batcher.close()
    assert not errors
    assert all(results[i][0, 0] == i for i in range(16))
    assert len(run.batches) < 16


def test_batches_never_exceed_max_batch_size():
    gate = threading.Event()
    run = Recorder(gate)
    batcher = DynamicBatcher(run, max_batch_size=4, max_delay_ms=1)
    threading.Timer(0.2, gate.set).start()
    results, errors = submit_concurrently(batcher, [[i, i] for i in range(10)])
    batcher.close()
    assert not errors and len(results) == 10
    assert max(len(b) for b in run.batches) <= 4


def test_padded_token_budget_splits_batches():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=64, max_batch_tokens=100, max_delay_ms=100)
    pendings = [batcher.submit([i], [40]) for i in range(5)]
    for p in pendings:
        batcher.wait(p)
    batcher.close()
    assert max(len(b) for b in run.batches) * 40 <= 100


def test_full_queue_is_refused_at_once():
    gate = threading.Event()
    batcher = DynamicBatcher(Recorder(gate), max_batch_size=2, max_delay_ms=0, max_queue_texts=4)
    first = batcher.submit([0, 1], [1, 1])          # taken by the worker, which blocks
    time.sleep(0.05)
    queued = batcher.submit([2, 3, 4, 5], [1] * 4)  # fills the queue
    with pytest.raises(Overloaded, match="queue is full"):
        batcher.submit([6], [1])
    gate.set()
    assert batcher.wait(first).shape == (2, 1) and batcher.wait(queued).shape == (4, 1)
    assert batcher.stats["rejected_full"] == 1
    batcher.close()


def test_expired_work_is_dropped_not_computed():
    gate = threading.Event()
    run = Recorder(gate)
    batcher = DynamicBatcher(run, max_batch_size=1, max_delay_ms=0)
    blocker = batcher.submit([0], [1])
    time.sleep(0.05)
    late = batcher.submit([99], [1], deadline=time.monotonic() + 0.02)
    time.sleep(0.1)
    gate.set()
    batcher.wait(blocker)
    with pytest.raises(BudgetSpent):
        batcher.wait(late)
    batcher.close()
    assert [99] not in run.batches
    assert batcher.stats["dropped_expired"] == 1


def test_a_failing_batch_reaches_every_caller():
    def broken(items):
        raise RuntimeError("boom")
    batcher = DynamicBatcher(broken, max_delay_ms=20)
    results, errors = submit_concurrently(batcher, [[1], [2]])
    batcher.close()
    assert not results and all(isinstance(e, RuntimeError) for e in errors.values())


def test_close_finishes_queued_work_then_refuses_new():
    gate = threading.Event()
    batcher = DynamicBatcher(Recorder(gate), max_batch_size=1, max_delay_ms=0)
    pendings = [batcher.submit([i], [1]) for i in range(3)]
    threading.Timer(0.1, gate.set).start()
    batcher.close()
    assert [batcher.wait(p)[0, 0] for p in pendings] == [0, 1, 2]
    with pytest.raises(NotReady):
        batcher.submit([9], [1])


def test_a_big_request_is_cut_into_chunks_and_answered_in_order():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=4, max_batch_tokens=1000, max_delay_ms=0)
    items = list(range(10))
    costs = [10 * (10 - i) for i in items]  # the longest first: chunks are length-sorted
    out = batcher(items, costs)
    batcher.close()
    assert out[:, 0].tolist() == items
    assert max(len(b) for b in run.batches) <= 4
    assert run.batches[0] == [9, 8, 7, 6]  # shortest texts together


def test_a_small_request_is_not_held_behind_a_big_ones_chunks():
    """Round robin: a request of many chunks gives up the next batch to one queued later."""
    gate = threading.Event()
    run = Recorder(gate)
    batcher = DynamicBatcher(run, max_batch_size=2, max_delay_ms=0)
    big = batcher.submit(list(range(100, 120)), [1] * 20)   # 10 chunks of 2
    time.sleep(0.05)                                       # its first chunk is running
    small = batcher.submit([7], [1])
    gate.set()
    assert batcher.wait(small)[0, 0] == 7
    assert batcher.wait(big).shape == (20, 1)
    batcher.close()
    taken = [b for b in run.batches]
    at = next(n for n, b in enumerate(taken) if 7 in b)
    assert at <= 1, taken  # the batch right after the chunk that was running


def test_several_workers_run_model_calls_side_by_side():
    running, peak, lock = [0], [0], threading.Lock()

    def slow(items):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return np.asarray(items, dtype=np.float32)[:, None]
    batcher = DynamicBatcher(slow, max_batch_size=1, max_delay_ms=0, workers=2)
    results, errors = submit_concurrently(batcher, [[i] for i in range(6)])
    batcher.close()
    assert not errors and sorted(results) == list(range(6))
    assert peak[0] == 2


def test_a_failing_chunk_fails_its_request_once_and_drops_the_rest():
    calls = []

    def broken(items):
        calls.append(list(items))
        raise RuntimeError("boom")
    batcher = DynamicBatcher(broken, max_batch_size=2, max_delay_ms=0)
    with pytest.raises(RuntimeError, match="boom"):
        batcher(list(range(10)), [1] * 10)
    batcher.close()
    assert len(calls) == 1 and batcher.queued_texts == 0
