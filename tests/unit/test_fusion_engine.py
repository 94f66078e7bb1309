"""FusionEngine in-process: real encoder, real Amazon events, both store backends."""

import time

import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.embedding.engine import EmbeddingEngine
from services.fusion.engine import FusionEngine
from recmodel.user_model import BaselineUserModel, OnnxUserModel
from services.fusion.sqlite_store import SQLiteProfileStore
from services.fusion.store import RECENT_PER_PLATFORM
from recmodel import modelrepo

NOW_MS = int(time.time() * 1000)


def ev(user="u1", platform="office", item="i1", text="blue ballpoint pens 12 pack",
       action=7, time_ms=NOW_MS - 1000, event_id="", weight=None):
    return dict(event_id=event_id, user_id=user, platform=platform, action=action,
                item_id=item, item_text=text, event_time_ms=time_ms, weight=weight)


@pytest.fixture(scope="module")
def embedder(encoder_dir):
    engine = EmbeddingEngine(encoder_dir, device="cpu")
    calls = []

    def embed(texts, budget_s=None):
        calls.append(list(texts))
        return engine.embed(texts)[0]
    embed.calls = calls
    return embed


def user_model(model_repo):
    if modelrepo.versions(model_repo, "user_tower"):
        return OnnxUserModel(modelrepo.resolve(model_repo, "user_tower"))
    return BaselineUserModel()


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SQLiteProfileStore(tmp_path / "p.sqlite3")
    else:
        from services.fusion.redis_store import RedisProfileStore
        s = RedisProfileStore(request.getfixturevalue("redis_url"),
                              prefix=f"t{time.monotonic_ns()}")
    yield s
    s.close()


@pytest.fixture
def engine(store, embedder, model_repo):
    return FusionEngine(store, embedder, user_model(model_repo), dim=384)


def test_ingest_then_profile_reflects_every_platform(engine, amazon_user):
    accepted, dups, conflicts = engine.ingest(amazon_user)
    assert (accepted, dups, conflicts) == (len(amazon_user), 0, 0)
    profile = engine.profile(amazon_user[0]["user_id"], for_platform="office")
    assert profile.known and {p.platform for p in profile.platforms} == {"arts_crafts", "office"}
    for vec in [profile.fused, profile.for_platform_vector] + [p.vector for p in profile.platforms]:
        assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-4
    assert sum(p.event_count for p in profile.platforms) == len(amazon_user)
    assert abs(sum(p.fusion_weight for p in profile.platforms) - 1) < 1e-4


def test_resent_events_are_duplicates_not_stored_twice(engine, amazon_user):
    engine.ingest(amazon_user)
    assert engine.ingest(amazon_user) == (0, len(amazon_user), 0)
    assert engine.profile(amazon_user[0]["user_id"]).total_events == len(amazon_user)


def test_each_item_text_is_embedded_once(engine, embedder):
    embedder.calls.clear()
    engine.ingest([ev(event_id="a", item="x1", text="glitter glue pens")])
    engine.ingest([ev(event_id="b", item="x1", text="glitter glue pens", user="u2")])
    engine.ingest([ev(event_id="c", item="x1", text="", user="u3")])  # text from the cache
    assert embedder.calls == [["glitter glue pens"]]


def test_cross_platform_view_exists_without_history_there(engine):
    engine.ingest([ev(event_id=f"e{i}", platform="arts_crafts", item=f"a{i}",
                      text=t) for i, t in enumerate(["acrylic paint set", "paint brushes"])])
    profile = engine.profile("u1", for_platform="office")
    assert [p.platform for p in profile.platforms] == ["arts_crafts"]
    assert profile.for_platform_vector is not None


def test_session_events_are_fused_but_never_stored(engine):
    session = [ev(user="", item="s1", text="wooden easel")]
    profile = engine.profile("anon", session=session, for_platform="arts_crafts")
    assert profile.known and profile.for_platform_vector is not None
    assert engine.profile("anon").known is False
    assert engine.store.get_items([("office", "s1")]) == {}


def test_recent_window_is_bounded_and_ordered_by_time(engine):
    events = [ev(event_id=f"e{i}", item=f"i{i % 5}", text=f"pen model {i % 5}",
                 time_ms=NOW_MS - 10_000 + (i * 7919) % 1000) for i in range(120)]
    engine.ingest(events[:60])
    engine.ingest(events[60:])
    history = engine.store.history("u1")["office"]
    assert history.count == 120 and len(history.events) == RECENT_PER_PLATFORM
    times = [e.event_time_ms for e in history.events]
    assert times == sorted(times) and times[0] >= sorted(e["event_time_ms"] for e in events)[70]


def test_delete_user_removes_everything_and_is_idempotent(engine, amazon_user):
    user = amazon_user[0]["user_id"]
    engine.ingest(amazon_user)
    assert engine.delete_user(user) == len(amazon_user)
    assert engine.profile(user).known is False
    assert engine.delete_user(user) == 0


@pytest.mark.parametrize("bad, fragment", [
    (ev(user=""), "events[1].user_id is required"),
    (ev(action=0), "events[1].action must be set"),
    (ev(action=42), "events[1].action must be one of"),
    (ev(platform="Office Supplies!"), "events[1].platform must match"),
    (ev(time_ms=NOW_MS + 7 * 24 * 3600 * 1000), "events[1].event_time_ms must be at most 24 h"),
    (ev(text="x" * 1_000_000), "events[1].item_text must be at most 65536 characters"),
    (ev(weight=float("nan")), "events[1].weight must be in"),
    (ev(text="", item="never-seen"), "events[1].item_text is required for an item not seen"),
])
def test_a_bad_event_rejects_the_whole_batch_naming_the_field(engine, bad, fragment):
    good = ev(event_id="good", item="g1", text="stapler")
    with pytest.raises(InvalidInput) as err:
        engine.ingest([good, bad])
    assert fragment in str(err.value)
    assert engine.profile("u1").known is False


def test_a_batch_over_the_limit_is_rejected(engine):
    with pytest.raises(InvalidInput, match="at most 1000 events, got 1001"):
        engine.ingest([ev(event_id=str(i)) for i in range(1001)])


def test_profile_of_an_unknown_user_is_empty_not_an_error(engine):
    profile = engine.profile("nobody", for_platform="office")
    assert not profile.known and profile.fused is None and profile.platforms == []


def test_a_resent_event_id_with_other_content_is_counted_as_a_conflict(engine):
    from services.common import metrics
    before = metrics.FUSION_EVENT_CONFLICTS._value.get()
    engine.ingest([ev(event_id="c1", item="x1", text="glitter glue pens")])
    assert engine.ingest([ev(event_id="c1", item="x2", text="glitter glue pens")]) == (0, 1, 1)
    assert engine.ingest([ev(event_id="c1", item="x1", text="")]) == (0, 1, 0)
    assert metrics.FUSION_EVENT_CONFLICTS._value.get() == before + 1


def long_texts(n, tag):
    return [ev(user="", item=f"{tag}-{i}", text=f"{tag} item {i} " + "handmade paper " * 120)
            for i in range(n)]


def test_a_session_with_more_new_texts_than_the_limit_is_refused_before_embedding(
        store, embedder, model_repo):
    engine = FusionEngine(store, embedder, user_model(model_repo), dim=384,
                          max_new_session_texts=16)
    embedder.calls.clear()
    with pytest.raises(InvalidInput, match="session_events carry 17 items .* at most 16"):
        engine.profile("", session=long_texts(17, "limit"))
    assert embedder.calls == [], "nothing was embedded"
    assert engine.profile("", session=long_texts(16, "limit")).known


def test_a_repeated_session_is_answered_from_the_session_cache_without_embedding(
        store, embedder, model_repo):
    engine = FusionEngine(store, embedder, user_model(model_repo), dim=384,
                          session_cache_items=100)
    session = long_texts(10, "repeat")
    first = engine.profile("", session=session, for_platform="office")
    embedder.calls.clear()
    again = engine.profile("", session=session, for_platform="office")
    assert embedder.calls == [], "a repeat embeds nothing"
    np.testing.assert_array_equal(first.for_platform_vector, again.for_platform_vector)
    changed = session[:9] + [dict(session[9], item_text="another text for the last item")]
    engine.profile("", session=changed)
    assert embedder.calls == [["another text for the last item"]], "only the changed text"
    assert engine.store.get_items([("office", "repeat-0")]) == {}, "never stored"


def _profile_arrays(p):
    return ([p.fused, p.for_platform_vector] + [v.vector for v in p.platforms]
            + [np.float32(w) for _, _, w in p.recent])


def test_the_user_vector_cache_answers_bit_for_bit_and_follows_every_change(
        store, embedder, model_repo, amazon_user):
    """Cached answers equal the model's own; a new event, a changed item text and a session
    event each change the key (nothing to invalidate), on either store."""
    from services.common import metrics
    cached = FusionEngine(store, embedder, user_model(model_repo), dim=384,
                          user_vector_cache_items=100)
    plain = FusionEngine(store, embedder, cached.model, dim=384)
    cached.ingest(amazon_user)
    hits = metrics.FUSION_USER_VECTOR_CACHE.labels("hit")
    user = amazon_user[0]["user_id"]

    def same(**kw):
        a, b = cached.profile(user, **kw), plain.profile(user, **kw)
        for x, y in zip(_profile_arrays(a), _profile_arrays(b), strict=True):
            assert np.array_equal(x, y)
        return a

    first = same(for_platform="office", recent_limit=10)
    before = hits._value.get()
    again = same(for_platform="office", recent_limit=10)
    assert hits._value.get() == before + 1
    assert np.array_equal(again.fused, first.fused)
    with pytest.raises(ValueError):  # shared answers cannot be changed in place
        again.fused[0] = 1.0
    same(for_platform="arts_crafts", recent_limit=10)
    cached.ingest([ev(user=user, item="new-item", text="a pack of fine drawing pencils")])
    moved = same(for_platform="office", recent_limit=10)
    assert not np.array_equal(moved.fused, first.fused)
    cached.ingest([ev(user=user, item="new-item", text="a large steel office stapler",
                      event_id="other-id")])
    changed = same(for_platform="office", recent_limit=10)
    assert not np.array_equal(changed.fused, moved.fused)
    session = same(for_platform="office", recent_limit=10,
                   session=[ev(user="", item="s1", text="watercolour paper pad A4")])
    assert not np.array_equal(session.fused, changed.fused)
