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
