"""The fusion engine's in-memory item cache: same answers as the store, coherent with writes."""

import time

import numpy as np

from services.fusion.engine import FusionEngine, ItemCache
from recmodel.user_model import BaselineUserModel
from services.fusion.sqlite_store import SQLiteProfileStore

NOW_MS = int(time.time() * 1000)


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
    return v / np.linalg.norm(v)


def ev(item: str, text: str, time_ms: int, user: str = "u1") -> dict:
    return dict(event_id="", user_id=user, platform="office", action=7, item_id=item,
                item_text=text, event_time_ms=time_ms, weight=None)


class CountingStore(SQLiteProfileStore):
    def __init__(self, path):
        super().__init__(path)
        self.item_reads = 0

    def get_items(self, keys, timeout_s=None):
        self.item_reads += 1
        return super().get_items(keys, timeout_s)


def fake_embed(texts, budget_s=None):
    return np.stack([vec(sum(map(ord, t))) for t in texts])


def engines(tmp_path):
    store = CountingStore(tmp_path / "p.sqlite3")
    cached = FusionEngine(store, fake_embed, BaselineUserModel(), dim=8, item_cache_items=100)
    plain = FusionEngine(store, fake_embed, BaselineUserModel(), dim=8)
    return store, cached, plain


def test_cached_profiles_equal_uncached_ones_and_skip_the_store(tmp_path):
    store, cached, plain = engines(tmp_path)
    cached.ingest([ev("a", "red stapler", NOW_MS - 3000), ev("b", "blue pens", NOW_MS - 2000)])
    reads = store.item_reads
    first = cached.profile("u1", "office", recent_limit=5)
    assert store.item_reads == reads  # the ingest filled the cache
    second = plain.profile("u1", "office", recent_limit=5)
    assert np.array_equal(first.fused, second.fused)
    assert [(e.item_text, v.tobytes()) for e, v, _ in first.recent] == \
        [(e.item_text, v.tobytes()) for e, v, _ in second.recent]
    store.close()


def test_a_changed_item_text_replaces_the_cached_vector(tmp_path):
    store, cached, _ = engines(tmp_path)
    cached.ingest([ev("a", "red stapler", NOW_MS - 3000)])
    cached.ingest([ev("a", "green stapler", NOW_MS - 2000)])
    (event, vector, _), = cached.profile("u1", "office", recent_limit=1).recent
    assert event.item_text == "green stapler"
    assert np.array_equal(vector, fake_embed(["green stapler"])[0])
    store.close()


def test_a_read_that_raced_a_write_is_not_kept():
    cache = ItemCache(10)
    since = cache.generation
    cache.write({("office", "a"): ("new text", vec(1))})
    cache.fill({("office", "a"): ("old text", vec(2))}, since)
    found, missing = cache.get([("office", "a")])
    assert found[("office", "a")][0] == "new text" and missing == []


def test_the_cache_keeps_the_most_recently_used_items():
    cache = ItemCache(2)
    cache.write({("p", "a"): ("a", vec(1)), ("p", "b"): ("b", vec(2))})
    cache.get([("p", "a")])
    cache.write({("p", "c"): ("c", vec(3))})
    found, missing = cache.get([("p", "a"), ("p", "b"), ("p", "c")])
    assert set(found) == {("p", "a"), ("p", "c")} and missing == [("p", "b")]
