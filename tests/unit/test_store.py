"""ProfileStore behaviour, the same tests against SQLiteProfileStore and RedisProfileStore."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import numpy as np
import pytest
from redis.crc import key_slot

from services.common.errors import BudgetSpent, NotReady, Overloaded
from recmodel.events import Event
from services.fusion.redis_store import RedisProfileStore
from services.fusion.sqlite_store import SQLiteProfileStore
from services.fusion.store import RECENT_PER_PLATFORM
from tests.reliability.support import frozen



T0 = 1_700_000_000_000


def event(event_id: str, user: str = "u1", platform: str = "amazon", time_ms: int = T0,
          item: str | None = None, action: int = 2, weight: float = 1.0) -> Event:
    return Event(event_id, user, platform, action, item or f"item-{event_id}", "some text",
                 time_ms, weight)


def ids(history, platform: str = "amazon") -> list[str]:
    return [e.event_id for e in history[platform].events]


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def open_store(request, tmp_path):
    """Opens a store on this test's database; a second call is a restart on the same data."""
    if request.param == "sqlite":
        def make():
            return SQLiteProfileStore(tmp_path / "profiles.db")
    else:
        url = request.getfixturevalue(
            "redis_cluster_url" if request.param == "redis-cluster" else "redis_url")
        prefix = f"test-{uuid.uuid4().hex[:12]}"

        def make():
            return RedisProfileStore(url, prefix=prefix)
    opened = []

    def opener():
        opened.append(make())
        return opened[-1]

    yield opener
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store):
    return open_store()


def test_append_counts_accepted_and_a_resend_is_all_duplicates(store):
    batch = [event("a"), event("b", platform="steam"), event("c")]
    assert store.append(batch) == (3, 0, 0)
    assert store.append(batch) == (0, 3, 0)
    history = store.history("u1")
    assert ids(history) == ["a", "c"] and ids(history, "steam") == ["b"]
    assert history["amazon"].count == 2 and history["steam"].count == 1


def test_duplicates_within_one_batch_are_stored_once(store):
    assert store.append([event("a"), event("a"), event("b"), event("a")]) == (2, 2, 0)
    assert ids(store.history("u1")) == ["a", "b"]


def test_an_event_id_is_deduplicated_per_user_not_globally(store):
    assert store.append([event("a", user="u1"), event("a", user="u2")]) == (2, 0, 0)
    # The same id on another platform: a duplicate, and a conflict (other content).
    assert store.append([event("a", user="u2", platform="steam")]) == (0, 1, 1)


def test_history_returns_the_stored_fields_with_empty_texts(store):
    stored = event("a", time_ms=T0 + 5, item="B0001", action=6, weight=4.5)
    store.append([stored])
    (got,) = store.history("u1")["amazon"].events
    assert got == Event("a", "u1", "amazon", 6, "B0001", "", T0 + 5, 4.5)


def test_out_of_order_events_are_ordered_by_time_then_event_id(store):
    store.append([event("late", time_ms=T0 + 30), event("early", time_ms=T0 + 10)])
    store.append([event("middle", time_ms=T0 + 20), event("b-tie", time_ms=T0 + 20),
                  event("a-tie", time_ms=T0 + 20), event("first", time_ms=T0)])
    assert ids(store.history("u1")) == ["first", "early", "a-tie", "b-tie", "middle", "late"]


def test_only_the_newest_events_are_kept_but_count_and_last_seen_are_all_time(store):
    n = RECENT_PER_PLATFORM + 20
    # Newest first, in two batches, so that trimming sees out-of-order arrivals.
    events = [event(f"e{i:03d}", time_ms=T0 + i) for i in reversed(range(n))]
    store.append(events[:30])
    store.append(events[30:])
    # Older than everything kept: counted, then trimmed at once.
    store.append([event("ancient", time_ms=T0 - 1000)])
    history = store.history("u1")["amazon"]
    assert [e.event_id for e in history.events] == [
        f"e{i:03d}" for i in range(n - RECENT_PER_PLATFORM, n)]
    assert history.count == n + 1
    assert history.last_seen_ms == T0 + n - 1


def test_history_of_an_unknown_user_is_empty(store):
    store.append([event("a", user="someone")])
    assert store.history("nobody") == {}


def test_user_ids_with_braces_and_unicode_are_kept_apart(store):
    users = ["{a}", "{a", "a}", "}{", "ünï {x} 用户", ""]
    store.append([event("e", user=u, item=f"i{n}") for n, u in enumerate(users)])
    for n, user in enumerate(users):
        (got,) = store.history(user)["amazon"].events
        assert (got.user_id, got.item_id) == (user, f"i{n}")


def test_delete_user_removes_everything_and_a_second_delete_returns_zero(store):
    store.append([event(f"a{i}", time_ms=T0 + i) for i in range(RECENT_PER_PLATFORM + 5)])
    store.append([event("s", platform="steam"), event("x", user="other")])
    assert store.delete_user("u1") == RECENT_PER_PLATFORM + 6
    assert store.history("u1") == {}
    assert store.delete_user("u1") == 0
    assert ids(store.history("other")) == ["x"]
    # The ids are gone too: the same events are new again.
    assert store.append([event("a0"), event("s", platform="steam")]) == (2, 0, 0)


def test_delete_of_an_unknown_user_returns_zero(store):
    assert store.delete_user("nobody") == 0


def test_item_cache_round_trips_float32_vectors_exactly(store):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 384)).astype(np.float32)
    vectors[0, :3] = [np.float32(1e-45), -0.0, np.float32(3.4e38)]
    items = {("amazon", "B1"): ("first title", vectors[0]),
             ("amazon", "B2"): ("second {title}", vectors[1]),
             ("steam", "B1"): ("ünïcode title", vectors[2])}
    store.put_items(items)
    got = store.get_items([("amazon", "B1"), ("steam", "B1"), ("amazon", "B2"),
                           ("amazon", "missing"), ("amazon", "B1")])
    assert set(got) == set(items)
    for key, (text, vector) in items.items():
        assert got[key][0] == text
        assert got[key][1].dtype == np.float32
        assert got[key][1].tobytes() == vector.tobytes()


def test_put_items_replaces_an_older_entry(store):
    store.put_items({("amazon", "B1"): ("old", np.zeros(4, np.float32))})
    store.put_items({("amazon", "B1"): ("new", np.ones(8, np.float32))})
    text, vector = store.get_items([("amazon", "B1")])[("amazon", "B1")]
    assert text == "new" and vector.tolist() == [1.0] * 8


def test_events_and_items_survive_closing_and_reopening_the_store(open_store):
    first = open_store()
    first.append([event("a", time_ms=T0 + 1), event("b", platform="steam")])
    vector = np.arange(16, dtype=np.float32) / 7
    first.put_items({("amazon", "B1"): ("title", vector)})
    first.close()
    with pytest.raises(NotReady):
        first.append([event("c")])

    second = open_store()
    history = second.history("u1")
    assert ids(history) == ["a"] and ids(history, "steam") == ["b"]
    assert history["amazon"].last_seen_ms == T0 + 1
    assert second.get_items([("amazon", "B1")])[("amazon", "B1")][1].tobytes() == \
        vector.tobytes()
    assert second.append([event("a", time_ms=T0 + 1)]) == (0, 1, 0)


def test_concurrent_appends_from_8_threads_lose_nothing(store):
    threads, batches, per_batch = 8, 10, 5
    shared = [event(f"shared{i}", user=f"u{i % 3}") for i in range(10)]
    results: list[tuple[int, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for b in range(batches):
                batch = [event(f"t{t}-b{b}-{i}", user=f"u{(t + i) % 3}", time_ms=T0 + b,
                               platform=("amazon", "steam")[i % 2]) for i in range(per_batch)]
                got = [store.append(batch), store.append(shared)]
                with lock:
                    results.extend(got)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    unique = threads * batches * per_batch
    assert sum(a for a, _, _ in results) == unique + len(shared)
    assert sum(d for _, d, _ in results) == (threads * batches - 1) * len(shared)
    stored = sum(h.count for u in ("u0", "u1", "u2") for h in store.history(u).values())
    assert stored == unique + len(shared)


def test_an_empty_append_stores_nothing(store):
    assert store.append([]) == (0, 0, 0)
    assert store.put_items({}) is None
    assert store.get_items([]) == {}


# --- SQLite only --------------------------------------------------------------------------
class _BlockingVector:
    """Parks the SQLite writer thread inside np.asarray until released."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def __array__(self, dtype=None, copy=None):
        self.entered.set()
        self.release.wait(30)
        return np.zeros(4, dtype=dtype or np.float32)


def test_sqlite_append_is_refused_with_overloaded_when_the_queue_is_full(tmp_path):
    store = SQLiteProfileStore(tmp_path / "profiles.db", max_queue_batches=1)
    blocker = _BlockingVector()
    filler = threading.Thread(target=store.put_items,
                              args=({("amazon", "B1"): ("t", blocker)},))
    filler.start()
    assert blocker.entered.wait(30), "the writer never picked up the blocking job"
    queued: list = []
    waiter = threading.Thread(target=lambda: queued.append(store.append([event("a")])))
    waiter.start()
    deadline = time.monotonic() + 30
    while not store._queue.full() and time.monotonic() < deadline:
        time.sleep(0.001)
    try:
        with pytest.raises(Overloaded, match="queue is full"):
            store.append([event("b")])
    finally:
        blocker.release.set()
        filler.join(30)
        waiter.join(30)
        store.close()
    assert queued == [(1, 0, 0)]


# --- Redis only ---------------------------------------------------------------------------
def closed_port() -> int:
    """A loopback port that was just free: bound, then released, so nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redis_store_on_a_closed_port_raises_not_ready_naming_the_address():
    port = closed_port()
    with pytest.raises(NotReady, match=rf"redis at 127\.0\.0\.1:{port} unreachable"):
        RedisProfileStore(f"redis://127.0.0.1:{port}/0", connect_timeout_s=1.0)


def test_redis_store_raises_not_ready_once_the_server_is_gone(start_redis):
    server = start_redis()
    store = RedisProfileStore(server.url)
    store.append([event("a")])
    server.kill()
    with pytest.raises(NotReady, match=rf"redis at 127\.0\.0\.1:{server.port} unreachable"):
        store.history("u1")
    with pytest.raises(NotReady, match="unreachable"):
        store.append([event("b")])
    store.close()


def test_redis_store_refuses_a_server_without_fsync_on_every_write(start_redis):
    server = start_redis("--appendfsync", "everysec")
    with pytest.raises(NotReady, match="appendfsync always"):
        RedisProfileStore(server.url)
    RedisProfileStore(server.url, require_fsync=False).close()


def test_redis_store_refuses_a_server_without_an_append_only_file(start_redis):
    server = start_redis("--appendonly", "no")
    with pytest.raises(NotReady, match="appendonly yes"):
        RedisProfileStore(server.url)


def test_redis_acknowledged_events_survive_a_server_crash_and_restart(start_redis):
    server = start_redis()
    store = RedisProfileStore(server.url)
    store.append([event(f"e{i}", time_ms=T0 + i) for i in range(5)])
    store.append([event("s", platform="steam", user="u2")])
    server.kill()
    server.start()
    # Same client, same pooled (now dead) connections: they reconnect, and the script cache,
    # empty after the restart, is reloaded by the write path.
    assert ids(store.history("u1")) == [f"e{i}" for i in range(5)]
    assert store.append([event("e0"), event("new", time_ms=T0 + 9)]) == (1, 1, 0)
    assert store.delete_user("u1") == 6
    assert ids(store.history("u2"), "steam") == ["s"]
    store.close()


# A budget far below the store's own socket limits (5 s per read, retried twice), and how
# long past it a call may take (thread wake-ups on a loaded machine).
BUDGET_S = 0.3
BUDGET_SLACK_S = 0.7


def timed_out(call, *args) -> tuple[str, float]:
    """(message, seconds) of a store call that must raise BudgetSpent."""
    started = time.monotonic()
    with pytest.raises(BudgetSpent) as err:
        call(*args, timeout_s=BUDGET_S)
    return str(err.value), time.monotonic() - started


def test_redis_calls_on_a_frozen_server_give_up_at_their_budget_naming_it(start_redis):
    server = start_redis()
    store = RedisProfileStore(server.url)
    store.append([event("a")])
    named = f"redis at 127.0.0.1:{server.port} did not answer within the call's budget"
    with frozen(server.proc.pid):
        for call, args in ((store.history, ("u1",)), (store.append, ([event("b")],)),
                           (store.get_items, ([("amazon", "B1")],)),
                           (store.put_items, ({("amazon", "B1"): ("t", np.ones(4, np.float32))},)),
                           (store.item_stats, ("amazon", 10)), (store.delete_user, ("u1",))):
            message, seconds = timed_out(call, *args)
            print(f"{call.__name__}: BudgetSpent after {seconds:.3f} s (budget {BUDGET_S} s)")
            assert message.startswith(named), message
            assert seconds < BUDGET_S + BUDGET_SLACK_S, f"{call.__name__} took {seconds:.2f} s"
    store.close()


def test_a_connection_cut_short_by_its_budget_is_never_reused_out_of_step(start_redis):
    server = start_redis()
    # One connection: the next call gets the very connection object that timed out.
    store = RedisProfileStore(server.url, max_connections=1)
    store.append([event("mine", user="u1"), event("theirs", user="u2", platform="steam")])
    with frozen(server.proc.pid):
        timed_out(store.history, "u1")
    time.sleep(0.2)  # Redis answers the cut-short read now, to a socket nobody reads
    assert ids(store.history("u2"), "steam") == ["theirs"]
    assert ids(store.history("u1")) == ["mine"]
    assert store.item_stats("steam", 10)[0][0] == "item-theirs"
    store.close()


def test_a_write_cut_short_by_its_budget_is_not_acknowledged_and_a_resend_dedupes(start_redis):
    server = start_redis()
    store = RedisProfileStore(server.url)
    batch = [event("x", time_ms=T0), event("y", time_ms=T0 + 1)]
    with frozen(server.proc.pid):
        message, _ = timed_out(store.append, batch)
    assert "re-sending it is safe" in message
    accepted, duplicates, _ = store.append(batch)  # whether or not Redis applied the first
    assert accepted + duplicates == 2
    assert store.append(batch) == (0, 2, 0)
    history = store.history("u1")
    assert ids(history) == ["x", "y"] and history["amazon"].count == 2
    store.close()


def test_a_spent_budget_asks_redis_nothing(redis_url):
    store = RedisProfileStore(redis_url, prefix=f"test-{uuid.uuid4().hex[:12]}")
    with pytest.raises(BudgetSpent, match="not asked"):
        store.append([event("a")], timeout_s=0)
    assert store.history("u1") == {}
    store.close()


def test_redis_keys_of_one_user_share_one_cluster_slot_even_with_braces_in_the_id(redis_url):
    for user in ["{a}", "a}{b", "{", "plain"]:
        store = RedisProfileStore(redis_url, prefix=f"test-{uuid.uuid4().hex[:12]}")
        store.append([event("e", user=user), event("f", user=user, platform="steam")])
        keys = list(store._client.scan_iter(match=f"{store.prefix}:{{u:*"))
        store.close()
        assert len(keys) == 5, keys  # events, stats, platforms, recent:amazon, recent:steam
        assert len({key_slot(k) for k in keys}) == 1


def test_redis_store_is_overloaded_when_every_connection_is_busy(redis_url):
    store = RedisProfileStore(redis_url, prefix=f"test-{uuid.uuid4().hex[:12]}", max_connections=1)
    held = store._client.connection_pool.get_connection()
    try:
        with pytest.raises(Overloaded, match="all 1 redis connections are busy"):
            store.append([event("a")])
    finally:
        store._client.connection_pool.release(held)
    assert store.append([event("a")]) == (1, 0, 0)
    store.close()


def test_item_stats_count_new_events_per_item_most_first(store):
    store.append([event("a", item="pen"), event("b", item="pen", time_ms=T0 + 5),
                  event("c", item="ink"), event("d", user="u2", item="pen")])
    store.append([event("a", item="pen")])  # a duplicate is not counted again
    assert store.item_stats("amazon", 10) == [("pen", 3, T0 + 5), ("ink", 1, T0)]
    assert store.item_stats("amazon", 1) == [("pen", 3, T0 + 5)]
    assert store.item_stats("other", 10) == []


# --- conflicts: a re-sent event id with other content ----------------------------------------

def test_a_resent_event_id_with_other_content_is_a_duplicate_and_a_conflict(open_store):
    store = open_store()
    assert store.append([event("a"), event("b")]) == (2, 0, 0)
    changed = [event("a", time_ms=T0 + 1), event("b", weight=2.0), event("a", item="other")]
    assert store.append(changed) == (0, 3, 3)
    assert store.append([event("a"), event("b")]) == (0, 2, 0), "a plain re-send"
    assert [e.event_time_ms for e in store.history("u1")["amazon"].events] == [T0, T0]
    store.close()
    assert open_store().append([event("a", weight=5.0)]) == (0, 1, 1), "after a restart"


def test_a_repeated_event_id_within_one_batch_with_other_content_is_a_conflict(store):
    assert store.append([event("a"), event("a", weight=3.0), event("a")]) == (1, 2, 1)


def test_event_ids_stored_before_digests_were_kept_dedupe_without_conflicts(tmp_path,
                                                                             redis_url):
    import sqlite3
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE event_ids (user_id TEXT NOT NULL, event_id TEXT NOT NULL, "
                   "PRIMARY KEY (user_id, event_id)) WITHOUT ROWID")
        db.execute("INSERT INTO event_ids VALUES ('u1', 'old')")
    store = SQLiteProfileStore(path)
    assert store.append([event("old", weight=9.0), event("new")]) == (1, 1, 0)
    store.close()
    redis_store = RedisProfileStore(redis_url, prefix=f"test-{uuid.uuid4().hex[:12]}")
    redis_store._client.sadd(redis_store._user_keys("u1")[0], "old")  # the former SET of ids
    assert redis_store.append([event("old", weight=9.0), event("new")]) == (1, 1, 0)
    redis_store.close()


# --- deleted users leave the SQLite files (secure_delete, checkpoint) -------------------------

def test_a_deleted_user_leaves_no_bytes_in_the_sqlite_files(tmp_path):
    store = SQLiteProfileStore(tmp_path / "p.db")
    secret = "user-0f5e2d-to-forget"
    store.append([event(f"e{i}", user=secret, time_ms=T0 + i) for i in range(80)])
    store.append([event("keep", user="someone-else")])
    store.history(secret)
    assert any(secret.encode() in f.read_bytes() for f in tmp_path.iterdir() if f.is_file())
    assert store.delete_user(secret) == 80
    left = {f.name for f in tmp_path.iterdir() if f.is_file() and secret.encode() in
            f.read_bytes()}
    assert not left, f"the deleted user id is still in {left}"
    assert store.history("someone-else")["amazon"].count == 1
    store.close()


# --- pseudonymous user ids at rest ------------------------------------------------------------

KEY = b"0123456789abcdef0123456789abcdef"


def redis_contents(client, prefix: str) -> bytes:
    """Every key under `prefix` and every member, field and value in it, as raw bytes."""
    out = []
    for key in client.scan_iter(match=f"{prefix}:*"):
        kind = client.type(key)
        out.append(key)
        if kind == b"hash":
            out += [b for kv in client.hgetall(key).items() for b in kv]
        elif kind == b"zset":
            out += client.zrange(key, 0, -1)
        elif kind == b"set":
            out += list(client.smembers(key))
        elif kind == b"string":
            out.append(client.get(key))
    return b"\x1f".join(out)


def test_pseudonymous_store_keeps_only_keyed_hashes_of_user_ids(open_store, tmp_path):
    from services.common.validation import validate_event
    from services.fusion.pseudonym import PseudonymousStore
    inner = open_store()
    store = PseudonymousStore(inner, KEY)
    user = "alice@example.org"
    derived = validate_event("", user, "amazon", 2, "i1", "", T0, None, field="e")
    assert store.append([event("a", user=user), derived]) == (2, 0, 0)
    assert store.append([derived]) == (0, 1, 0), "a derived id still dedupes"
    history = store.history(user)
    assert {e.user_id for e in history["amazon"].events} == {user}
    assert inner.history(user) == {}, "stored under the keyed hash only"
    stored = inner.history(store.pseudonym(user))["amazon"].events
    assert derived.event_id not in {e.event_id for e in stored}, "derived ids are keyed too"
    if isinstance(inner, SQLiteProfileStore):
        inner.close()
        blobs = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.is_file())
        assert user.encode() not in blobs and store.pseudonym(user).encode() in blobs
        inner = open_store()
        store = PseudonymousStore(inner, KEY)
    else:
        assert user.encode() not in redis_contents(inner._client, inner.prefix)
    assert PseudonymousStore(inner, b"another key of 32 bytes, or so!!").history(user) == {}
    assert store.delete_user(user) == 2
    assert store.history(user) == {} and inner.history(store.pseudonym(user)) == {}


def test_a_user_id_key_shorter_than_16_characters_is_refused(store):
    from services.fusion.pseudonym import PseudonymousStore
    with pytest.raises(ValueError, match="at least 16"):
        PseudonymousStore(store, b"short")


# --- replica acknowledgements (WAIT) ----------------------------------------------------------

def test_with_replica_acks_an_append_no_replica_confirms_is_not_ready_and_stays_stored(
        redis_url):
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    store = RedisProfileStore(redis_url, prefix=prefix, replica_acks=1, replica_ack_timeout_ms=50)
    with pytest.raises(NotReady, match=r"reached 0 of 1 replicas within 50 ms"):
        store.append([event("a")])
    with pytest.raises(NotReady, match="reached 0 of 1"):
        store.append([event("a")])  # a duplicate is acknowledged only once replicated too
    store.close()
    plain = RedisProfileStore(redis_url, prefix=prefix)
    assert plain.append([event("a")]) == (0, 1, 0), "stored on the primary all along"
    plain.close()


def test_with_replica_acks_an_append_returns_once_a_replica_has_it(start_redis):
    primary = start_redis("--repl-diskless-sync-delay", "0")  # the replica syncs at once
    replica = start_redis("--replicaof", "127.0.0.1", str(primary.port))
    store = RedisProfileStore(primary.url, replica_acks=1, replica_ack_timeout_ms=10_000)
    assert store.append([event("a"), event("b", user="u2")]) == (2, 0, 0)
    store.close()
    from_replica = RedisProfileStore(replica.url)
    assert ids(from_replica.history("u1")) == ["a"]
    from_replica.close()
