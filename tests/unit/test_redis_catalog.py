"""RedisCatalog: two replicas on one real redis-server stay in step through the change log."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from services.common.errors import BudgetSpent, NotReady
from services.ranking.catalog import CatalogItem
from services.ranking.redis_catalog import RedisCatalog
from tests.reliability.support import frozen, percentile

DIM = 16
# How long a replica may take to show another replica's write before the test gives up: far
# above what it takes (milliseconds), far below a hang.
VISIBLE_WITHIN_S = 10.0


def unit_vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def item(item_id: str, platform: str = "office", title: str = "") -> CatalogItem:
    title = title or f"item {item_id}"
    return CatalogItem(item_id, platform, title, {"brand": "b"}, title)


def wait_until(check, what: str) -> float:
    """Seconds until `check()` holds (polled every 0.5 ms), bounded by VISIBLE_WITHIN_S."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > VISIBLE_WITHIN_S:
            raise AssertionError(f"{what} not within {VISIBLE_WITHIN_S:.0f} s")
        time.sleep(0.0005)
    return time.monotonic() - started


@pytest.fixture(params=["redis", "redis-cluster"])
def replicas(request):
    """Opens replicas of one catalogue (own key prefix per test) on one Redis or on a Redis
    Cluster; all closed at teardown."""
    redis_url = request.getfixturevalue(
        "redis_cluster_url" if request.param == "redis-cluster" else "redis_url")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    opened: list[RedisCatalog] = []

    def open_replica(**kwargs) -> RedisCatalog:
        opened.append(RedisCatalog(redis_url, DIM, prefix=prefix, **kwargs))
        return opened[-1]

    yield open_replica
    for catalog in opened:
        catalog.close()


def test_an_upsert_is_served_at_once_by_its_replica_and_soon_by_another(replicas):
    a, b = replicas(), replicas()
    vectors = unit_vectors(50, seed=1)
    acks, lags = [], []
    for n in range(50):
        started = time.monotonic()
        a.upsert([item(f"i{n}")], vectors[n:n + 1])
        acks.append(time.monotonic() - started)
        assert a.get("office", f"i{n}") is not None, "the writing replica serves it on return"
        lags.append(wait_until(lambda: b.get("office", f"i{n}") is not None, f"i{n} on B"))
    ms = lambda values, q: f"{percentile(values, q) * 1000:.1f}"  # noqa: E731
    print(f"\n50 upserts: acknowledged (durable, served by A) p50 {ms(acks, 50)} ms, "
          f"max {ms(acks, 100)} ms; then on B after p50 {ms(lags, 50)} ms, "
          f"p95 {ms(lags, 95)} ms, max {ms(lags, 100)} ms")
    assert b.size("office") == 50 and b.platforms() == ["office"]
    got = b.index("office").vectors(["i7"])[0]
    np.testing.assert_array_equal(got, vectors[7])
    assert b.index("office").search(vectors[7], 1)[0] == ["i7"]
    assert b.get("office", "i7").attributes == {"brand": "b"}


def test_a_delete_through_one_replica_disappears_from_the_other(replicas):
    a, b = replicas(), replicas()
    a.upsert([item("keep"), item("drop")], unit_vectors(2, seed=2))
    wait_until(lambda: b.size("office") == 2, "both items on B")
    assert b.delete("office", ["drop", "never-there"]) == 1
    assert b.get("office", "drop") is None, "the deleting replica drops it on return"
    wait_until(lambda: a.get("office", "drop") is None, "the delete on A")
    assert a.item_ids("office") == ["keep"]
    assert "drop" not in a.index("office").search(unit_vectors(1, seed=2)[0], 5)[0]
    assert b.delete("office", ["drop"]) == 0


def test_a_new_replica_loads_everything_stored(replicas):
    a = replicas()
    vectors = unit_vectors(30, seed=3)
    a.upsert([item(str(n), platform=("office", "arts")[n % 2]) for n in range(30)], vectors)
    a.upsert([item("3", platform="arts", title="renamed")], vectors[10:11])
    a.delete("office", ["4"])
    a.close()
    c = replicas()
    assert c.platforms() == ["arts", "office"]
    assert c.size("office") == 14 and c.size("arts") == 15
    assert c.get("arts", "3").title == "renamed"
    np.testing.assert_array_equal(c.index("arts").vectors(["3"])[0], vectors[10])


def live_ids(catalog) -> list[str]:
    snap = catalog.index("office").snapshot()
    return [snap.ids[r] for r in np.flatnonzero(snap.alive)]


def test_every_replica_holds_the_rows_in_write_order_whatever_the_ids_sort_to(replicas):
    """The replica that wrote, one tailing the log and one loading later (HSCAN returns hash
    order): the same live rows in the same order, the order of the writes, so ties and scan
    sums agree on every replica (the SQLite catalogue's test does the same)."""
    a, b = replicas(), replicas()
    ids = [f"i{n}" for n in range(200)][::-1]  # hash and key order both differ from these
    vectors = unit_vectors(len(ids) + 1, seed=6)
    for start in range(0, len(ids), 50):
        a.upsert([item(i) for i in ids[start:start + 50]], vectors[start:start + 50])
    a.upsert([item(ids[0], title="moved to the end")], vectors[-1:])
    a.delete("office", [ids[1]])
    expected = ids[2:] + ids[:1]
    wait_until(lambda: live_ids(b) == expected, "B in write order")
    c = replicas()
    for replica in (a, b, c):
        assert live_ids(replica) == expected
        np.testing.assert_array_equal(replica.index("office").vectors(expected),
                                      np.concatenate([vectors[2:len(ids)], vectors[-1:]]))


def test_replicas_writing_the_same_item_at_once_converge_on_what_redis_holds(replicas):
    a, b = replicas(), replicas()
    vectors = unit_vectors(80, seed=4)

    def writer(catalog, offset):
        for n in range(40):
            catalog.upsert([item("hot", title=f"v{offset + n}")],
                           vectors[offset + n:offset + n + 1])

    threads = [threading.Thread(target=writer, args=(a, 0)),
               threading.Thread(target=writer, args=(b, 40))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    third = replicas()  # reads Redis as it is now
    truth = third.get("office", "hot").title
    for replica in (a, b):
        wait_until(lambda: replica.get("office", "hot").title == truth, "convergence")
        np.testing.assert_array_equal(replica.index("office").vectors(["hot"])[0],
                                      third.index("office").vectors(["hot"])[0])
        assert replica.size("office") == 1


def test_a_replica_behind_a_trimmed_log_reloads_instead_of_missing_writes(replicas):
    a = replicas(log_max_entries=10)
    b = replicas(log_max_entries=10)
    b._stop.set()  # B's tail stops: B falls behind while A writes
    b._tail.join(10)
    vectors = unit_vectors(300, seed=5)
    for n in range(300):
        a.upsert([item(f"t{n}")], vectors[n:n + 1])
    a.delete("office", ["t0"])
    b._stop.clear()
    b._tail = threading.Thread(target=b._tail_loop, daemon=True)
    b._tail.start()
    wait_until(lambda: b.size("office") == 299, "B caught up")
    assert b.get("office", "t0") is None and b.get("office", "t299") is not None


def test_the_catalogue_refuses_a_redis_without_fsync_on_every_write(start_redis):
    server = start_redis("--appendfsync", "everysec")
    with pytest.raises(NotReady, match="appendfsync always"):
        RedisCatalog(server.url, DIM)


def test_a_replica_keeps_serving_while_redis_is_down_and_catches_up_after(start_redis):
    server = start_redis()
    a, b = RedisCatalog(server.url, DIM), RedisCatalog(server.url, DIM)
    try:
        a.upsert([item("before")], unit_vectors(1, seed=6))
        wait_until(lambda: b.get("office", "before") is not None, "before on B")
        server.kill()
        with pytest.raises(NotReady, match=f"redis at 127.0.0.1:{server.port} unreachable"):
            a.upsert([item("while-down")], unit_vectors(1, seed=7))
        assert b.get("office", "before") is not None, "the last state is still served"
        server.start()
        a.upsert([item("after")], unit_vectors(1, seed=8))
        wait_until(lambda: b.get("office", "after") is not None, "after on B")
        assert b.get("office", "while-down") is None
    finally:
        a.close()
        b.close()


def test_catalogue_writes_on_a_frozen_redis_give_up_at_their_budget_naming_it(start_redis):
    server = start_redis()
    catalog = RedisCatalog(server.url, DIM)
    budget_s = 0.5
    try:
        catalog.upsert([item("before")], unit_vectors(1, seed=9))
        with frozen(server.proc.pid):
            for call, args in ((catalog.upsert, ([item("frozen")], unit_vectors(1, seed=10))),
                               (catalog.delete, ("office", ["before"]))):
                started = time.monotonic()
                with pytest.raises(BudgetSpent) as err:
                    call(*args, timeout_s=budget_s)
                seconds = time.monotonic() - started
                print(f"{call.__name__}: BudgetSpent after {seconds:.3f} s (budget {budget_s} s)")
                assert str(err.value).startswith(
                    f"redis at 127.0.0.1:{server.port} did not answer within the call's budget")
                assert "re-sending it is safe" in str(err.value)
                assert seconds < budget_s + 1.0
        catalog.upsert([item("after")], unit_vectors(1, seed=11), timeout_s=5.0)
        assert catalog.get("office", "after") is not None
    finally:
        catalog.close()
