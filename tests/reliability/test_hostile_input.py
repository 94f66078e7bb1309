"""Hostile input, property-based, against the running servers over gRPC: every RPC of every
service gets huge, empty, unicode and control-character strings, NaN and infinite weights,
out-of-range numbers, batches of 10^5 and random raw bytes as the request body.

Properties: a server never crashes (alive and SERVING after every run); every failure is
INVALID_ARGUMENT or NOT_FOUND with a non-empty message, never INTERNAL, UNKNOWN or a hang;
a rejected batch writes nothing (users stay unknown or unchanged, items stay absent).
The short form runs a fixed (derandomised) set of 40-60 examples per property; `-m slow` runs
600 random ones each.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter, defaultdict

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from tests.reliability.conftest import PLATFORMS
from tests.reliability.support import (CLIENT_ERRORS, is_alive_and_serving, pb_event,
                                       pb_item, rpc_outcome, rss_kib)

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SHORT_EXAMPLES = 60
LONG_EXAMPLES = 600
RAW_SHORT_EXAMPLES = 40
CALL_TIMEOUT_S = 30.0
NOW_MS = int(time.time() * 1000)
DAY_MS = 24 * 3600 * 1000
INT32 = st.integers(-2**31, 2**31 - 1)
INT64 = st.integers(-2**63, 2**63 - 1)
ANSWERS: defaultdict = defaultdict(Counter)
NONCE = itertools.count()

budgets = pytest.mark.parametrize("examples", [
    pytest.param(SHORT_EXAMPLES, id="short"),
    pytest.param(LONG_EXAMPLES, id="long", marks=pytest.mark.slow)])

# --- strategies -----------------------------------------------------------------------------
SPECIAL_TEXTS = ["", " ", "\x00", "\t\r\n", "\u200b", "\ufeff", "\u202e", "office\n", "\x7f\x9f",
                 "\U0001f642" * 40, "\u00e9" * 70, "a" * 129, "e\u0301" * 50, "' OR 1=1 --",
                 "{u:x}", "%s%n", "../..", "\\", "*", "\ud7ff\ue000\uffff"]
hostile_text = st.one_of(
    st.sampled_from(SPECIAL_TEXTS),
    st.text(max_size=64),  # any code point but surrogates
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn"]), max_size=32),
    st.builds(lambda c, n: c * n, st.sampled_from(["x", "\u00e9", "\U0001f642", " ", "\x00"]),
              st.integers(2_000, 100_000)))
platform = st.one_of(st.sampled_from(PLATFORMS),
                     st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True), hostile_text)
ident = st.one_of(st.from_regex(r"[A-Za-z0-9_.:-]{1,24}", fullmatch=True), hostile_text)
event_time = st.one_of(st.just(0), st.integers(0, NOW_MS), INT64,
                       st.sampled_from([-1, NOW_MS + 2 * DAY_MS, 2**63 - 1]))
weight = st.one_of(st.none(), st.floats(width=32),
                   st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 100.0, 1e-45]))
action = st.one_of(st.integers(0, 8), INT32)
real_title = st.sampled_from(["heavy duty stapler", "acrylic paint set 24 colours",
                              "spiral notebook a5 ruled", "glue sticks, 12 pack"])
wild_event = st.fixed_dictionaries(dict(
    event_id=st.one_of(st.just(""), ident), user_id=st.one_of(st.just(""), ident),
    platform=platform, action=action, item_id=ident,
    item_text=st.one_of(real_title, hostile_text), event_time_ms=event_time, weight=weight))
# Nearly always valid: with one field swapped for a hostile value (below) the all-or-nothing
# paths are reached, which fully random events almost never are.
sane_event = st.fixed_dictionaries(dict(
    event_id=st.one_of(st.just(""), st.from_regex(r"[!-~]{1,40}", fullmatch=True)),
    user_id=st.one_of(st.from_regex(r"[A-Za-z0-9]{1,20}", fullmatch=True),
                      st.text(min_size=1, max_size=30)),
    platform=st.sampled_from(PLATFORMS), action=st.integers(1, 7),
    item_id=st.one_of(st.from_regex(r"[A-Za-z0-9]{1,20}", fullmatch=True),
                      st.text(min_size=1, max_size=30)),
    item_text=st.one_of(real_title, st.text(min_size=1, max_size=200)),
    event_time_ms=st.integers(1, NOW_MS), weight=st.one_of(st.none(), st.floats(0.01, 100))))
EVENT_FIELDS = dict(event_id=ident, user_id=st.one_of(st.just(""), ident), platform=platform,
                    action=action, item_id=st.one_of(st.just(""), ident), item_text=hostile_text,
                    event_time_ms=event_time, weight=weight)
event = st.one_of(wild_event, sane_event, *(
    st.builds(lambda e, v, f=f: {**e, f: v}, sane_event, values)
    for f, values in EVENT_FIELDS.items()))
events = st.lists(event, max_size=4)
wild_item = st.fixed_dictionaries(dict(
    item_id=ident, platform=platform, title=st.one_of(real_title, hostile_text),
    attributes=st.one_of(st.just({}), st.dictionaries(hostile_text, hostile_text, max_size=3),
                         st.dictionaries(st.text(min_size=1, max_size=8), st.just("v"),
                                         min_size=17, max_size=20))))
sane_item = st.fixed_dictionaries(dict(
    item_id=st.from_regex(r"[A-Za-z0-9]{1,20}", fullmatch=True),
    platform=st.sampled_from(PLATFORMS), title=st.one_of(real_title, st.text(min_size=1,
                                                                          max_size=100)),
    attributes=st.dictionaries(st.text(max_size=10), st.text(max_size=50), max_size=3)))
ITEM_FIELDS = dict(item_id=st.one_of(st.just(""), ident), platform=platform, title=hostile_text,
                   attributes=wild_item.map(lambda it: it["attributes"]))
item = st.one_of(wild_item, sane_item, *(
    st.builds(lambda it, v, f=f: {**it, f: v}, sane_item, values)
    for f, values in ITEM_FIELDS.items()))


def run_property(rpc: str, examples: int, strategy, check) -> None:
    """Run `check` on `examples` generated cases (it calls answered_properly(rpc, ...) once
    per case); print how many were tried and what the server answered."""
    ANSWERS.pop(rpc, None)

    @settings(max_examples=examples, deadline=None, database=None,
              derandomize=examples <= SHORT_EXAMPLES, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(case):
        check(case)

    prop()
    answers = ANSWERS[rpc]
    print(f"\n{rpc}: {sum(answers.values())} hostile cases: "
          + ", ".join(f"{n} {code}" for code, n in answers.most_common()))


def answered_properly(rpc: str, code: grpc.StatusCode, details: str) -> None:
    ANSWERS[rpc][code.name] += 1
    assert code == OK or code in CLIENT_ERRORS, f"{rpc} answered {code.name}: {details!r}"
    if code != OK:
        assert details.strip(), f"{rpc} answered {code.name} without a message"


def fresh(nonce: int, value: str) -> str:
    """A value no earlier case used (empty stays empty: that is the hostile part)."""
    return f"fz{nonce}-{value}" if value else ""


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stubs(stack):
    channels = {n: grpc.insecure_channel(stack[n].address) for n in stack}
    yield dict(embedding=embedding_pb2_grpc.EmbeddingServiceStub(channels["embedding"]),
               fusion=fusion_pb2_grpc.FusionServiceStub(channels["fusion"]),
               ranking=ranking_pb2_grpc.RankingServiceStub(channels["ranking"]),
               channels=channels)
    for channel in channels.values():
        channel.close()


@pytest.fixture(autouse=True)
def servers_survive(stack):
    yield
    down = [name for name, proc in stack.items() if not is_alive_and_serving(proc)]
    assert not down, f"not alive and SERVING after the run: {down}"


def profile_of(stubs, user: str) -> fusion_pb2.GetProfileResponse:
    """The user's profile. An id GetProfile refuses (over 128 bytes) reads as unknown: Ingest
    refuses the very same ids, so nothing can be stored under it."""
    try:
        return stubs["fusion"].GetProfile(fusion_pb2.GetProfileRequest(user_id=user),
                                          timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        return fusion_pb2.GetProfileResponse(user_id=user, known=False)


def catalogue_size(stubs, user: str, platform_name: str) -> int:
    return len(stubs["ranking"].Recommend(ranking_pb2.RecommendRequest(
        user_id=user, platform=platform_name, k=1000), timeout=CALL_TIMEOUT_S).items)


# --- typed properties, one per RPC ------------------------------------------------------------
@budgets
def test_embed_answers_hostile_texts_with_unit_vectors_or_invalid_argument(stubs, examples):
    def check(texts):
        code, details, _, reply = rpc_outcome(stubs["embedding"].Embed, embedding_pb2.EmbedRequest(
            texts=texts), timeout=CALL_TIMEOUT_S)
        answered_properly("Embed", code, details)
        if code == OK:
            assert len(reply.embeddings) == len(texts)
            for e in reply.embeddings:
                assert len(e.values) == reply.dim
                norm = math.sqrt(sum(v * v for v in e.values))
                assert abs(norm - 1) < 1e-3, f"norm {norm} for a hostile text"

    run_property("Embed", examples, st.lists(hostile_text, max_size=6), check)


@budgets
def test_ingest_rejects_hostile_batches_whole_and_writes_nothing_of_them(
        stubs, known_users, examples):
    def check(case):
        batch, with_known = case
        nonce = next(NONCE)
        batch = [dict(e, user_id=fresh(nonce, e["user_id"])) for e in batch]
        if batch and with_known:
            batch[0]["user_id"] = known_users[0]
        known_before = {u: profile_of(stubs, u).total_events for u in known_users
                        if any(e["user_id"] == u for e in batch)}
        code, details, _, reply = rpc_outcome(stubs["fusion"].Ingest, fusion_pb2.IngestRequest(
            events=[pb_event(e) for e in batch]), timeout=CALL_TIMEOUT_S)
        answered_properly("Ingest", code, details)
        if code == OK:
            assert reply.accepted + reply.duplicates == len(batch)
            return
        for user in {e["user_id"] for e in batch if e["user_id"]}:
            profile = profile_of(stubs, user)
            if user in known_before:
                assert profile.total_events == known_before[user], "a rejected batch wrote"
            else:
                assert not profile.known, f"rejected batch ({details}) stored {user!r}"

    run_property("Ingest", examples, st.tuples(events, st.booleans()), check)


@budgets
def test_ingest_stream_stores_exactly_the_batches_before_a_rejected_one(stubs, examples):
    def check(batches):
        nonce = next(NONCE)
        batches = [[dict(e, user_id=fresh(nonce, f"{b}-{e['user_id']}" if e["user_id"] else ""))
                    for e in batch] for b, batch in enumerate(batches)]
        code, details, _, reply = rpc_outcome(
            stubs["fusion"].IngestStream,
            iter([fusion_pb2.IngestRequest(events=[pb_event(e) for e in batch])
                  for batch in batches]), timeout=CALL_TIMEOUT_S)
        answered_properly("IngestStream", code, details)
        stored = []
        for batch in batches:
            users = {e["user_id"] for e in batch if e["user_id"]}
            known = {profile_of(stubs, u).known for u in users}
            assert len(known) <= 1, f"a batch was partly stored: {batch}"
            stored.extend(known)
        assert stored == sorted(stored, reverse=True), \
            f"a batch after a rejected one was stored: {stored}"
        if code == OK:
            assert all(stored) and reply.batches == len(batches)
            assert reply.accepted + reply.duplicates == sum(len(b) for b in batches)

    run_property("IngestStream", examples, st.lists(st.lists(event, max_size=3), max_size=3),
                 check)


@budgets
def test_get_profile_answers_hostile_requests_with_a_profile_or_invalid_argument(
        stubs, known_users, examples):
    user = st.one_of(st.sampled_from(known_users), st.just(""), ident)

    def check(case):
        user_id, for_platform, session, limit = case
        code, details, _, reply = rpc_outcome(stubs["fusion"].GetProfile,
                                              fusion_pb2.GetProfileRequest(
            user_id=user_id, for_platform=for_platform, recent_events_limit=limit,
            session_events=[pb_event(e) for e in session]), timeout=CALL_TIMEOUT_S)
        answered_properly("GetProfile", code, details)
        if code == OK:
            assert len(reply.recent_events) <= limit
            for vector in (reply.fused_vector, reply.for_platform_vector):
                assert all(math.isfinite(v) for v in vector)

    run_property("GetProfile", examples, st.tuples(
        user, st.one_of(st.just(""), platform), st.lists(event, max_size=3),
        st.one_of(st.integers(0, 200), INT32)), check)


@budgets
def test_delete_user_of_a_hostile_unknown_id_deletes_nothing(stubs, examples):
    def check(user_id):
        user_id = fresh(next(NONCE), user_id)
        code, details, _, reply = rpc_outcome(stubs["fusion"].DeleteUser,
                                              fusion_pb2.DeleteUserRequest(user_id=user_id),
                                              timeout=CALL_TIMEOUT_S)
        answered_properly("DeleteUser", code, details)
        if code == OK:
            assert reply.deleted_events == 0

    run_property("DeleteUser", examples, ident, check)


@budgets
def test_get_item_stats_answers_hostile_requests_with_ranked_stats_or_invalid_argument(
        stubs, examples):
    def check(case):
        platform_name, limit = case
        code, details, _, reply = rpc_outcome(
            stubs["fusion"].GetItemStats,
            fusion_pb2.GetItemStatsRequest(platform=platform_name, limit=limit),
            timeout=CALL_TIMEOUT_S)
        answered_properly("GetItemStats", code, details)
        if code == OK:
            counts = [s.event_count for s in reply.items]
            assert counts == sorted(counts, reverse=True) and len(counts) <= (limit or 100_000)

    run_property("GetItemStats", examples,
                 st.tuples(platform, st.one_of(st.integers(0, 10), INT32)), check)


@budgets
def test_upsert_items_rejects_hostile_batches_whole_and_stores_nothing_of_them(
        stubs, examples):
    def check(items):
        nonce = next(NONCE)
        items = [dict(it, item_id=fresh(nonce, f"{n}-{it['item_id']}" if it["item_id"] else ""))
                 for n, it in enumerate(items)]
        code, details, _, reply = rpc_outcome(stubs["ranking"].UpsertItems,
                                              ranking_pb2.UpsertItemsRequest(
            items=[pb_item(it) for it in items]), timeout=CALL_TIMEOUT_S)
        answered_properly("UpsertItems", code, details)
        if code == OK:
            assert reply.upserted == len(items)
        by_platform: dict[str, list[str]] = {}
        for it in items:
            if it["item_id"]:
                by_platform.setdefault(it["platform"], []).append(it["item_id"])
        for platform_name, ids in by_platform.items():
            code_d, _, _, deleted = rpc_outcome(stubs["ranking"].DeleteItems,
                                                ranking_pb2.DeleteItemsRequest(
                platform=platform_name, item_ids=ids), timeout=CALL_TIMEOUT_S)
            if code_d != OK:
                continue  # a platform DeleteItems refuses cannot hold items either
            expected = len(set(ids)) if code == OK else 0
            assert deleted.deleted == expected, \
                f"{'stored' if code == OK else 'rejected'} batch ({details}): {deleted.deleted}"

    run_property("UpsertItems", examples, st.lists(item, max_size=4), check)


@budgets
def test_delete_items_ignores_hostile_unknown_ids_and_leaves_the_catalogue_whole(
        stubs, known_users, examples):
    sizes = {p: catalogue_size(stubs, known_users[0], p) for p in PLATFORMS}

    def check(case):
        platform_name, ids = case
        nonce = next(NONCE)
        code, details, _, reply = rpc_outcome(stubs["ranking"].DeleteItems,
                                              ranking_pb2.DeleteItemsRequest(
            platform=platform_name, item_ids=[fresh(nonce, i) for i in ids]),
            timeout=CALL_TIMEOUT_S)
        answered_properly("DeleteItems", code, details)
        if code == OK:
            assert reply.deleted == 0

    run_property("DeleteItems", examples, st.tuples(platform, st.lists(ident, max_size=5)),
                 check)
    assert {p: catalogue_size(stubs, known_users[0], p) for p in PLATFORMS} == sizes


@budgets
def test_recommend_answers_hostile_requests_with_ranked_items_or_invalid_argument(
        stubs, known_users, examples):
    user = st.one_of(st.sampled_from(known_users), st.just(""), ident)
    k = st.one_of(st.integers(1, 50), st.integers(-2, 1002), INT32)
    lam = st.one_of(st.floats(0, 1, width=32), st.floats(width=32),
                    st.sampled_from([math.nan, math.inf, -0.0, 1.0]))

    def check(case):
        user_id, platform_name, k_, exclude, session, diversify, lam_ = case
        code, details, _, reply = rpc_outcome(stubs["ranking"].Recommend,
                                              ranking_pb2.RecommendRequest(
            user_id=user_id, platform=platform_name, k=k_, exclude_seen=exclude,
            session_events=[pb_event(e) for e in session], diversify=diversify,
            diversity_lambda=lam_), timeout=CALL_TIMEOUT_S)
        answered_properly("Recommend", code, details)
        if code == OK:
            assert len(reply.items) <= k_
            assert all(i.platform == platform_name and math.isfinite(i.score)
                       for i in reply.items)

    run_property("Recommend", examples, st.tuples(
        user, st.one_of(st.sampled_from(PLATFORMS), platform), k, st.booleans(),
        st.lists(event, max_size=2), st.booleans(), lam), check)


# --- raw bytes as the request body ----------------------------------------------------------
TEMPLATES = {
    "/crossrec.embedding.v1.EmbeddingService/Embed":
        embedding_pb2.EmbedRequest(texts=["red stapler", "blue pen"]),
    "/crossrec.embedding.v1.EmbeddingService/ModelInfo": embedding_pb2.ModelInfoRequest(),
    "/crossrec.fusion.v1.FusionService/Ingest": fusion_pb2.IngestRequest(events=[pb_event(dict(
        event_id="raw-1", user_id="raw-user", platform="office", action=2, item_id="raw-item",
        item_text="red stapler", event_time_ms=NOW_MS, weight=2.0))]),
    "/crossrec.fusion.v1.FusionService/IngestStream": None,  # stream of Ingest bodies
    "/crossrec.fusion.v1.FusionService/GetProfile": fusion_pb2.GetProfileRequest(
        user_id="raw-user", for_platform="office", recent_events_limit=3),
    "/crossrec.fusion.v1.FusionService/DeleteUser":
        fusion_pb2.DeleteUserRequest(user_id="raw-user-to-delete"),
    "/crossrec.fusion.v1.FusionService/GetItemStats":
        fusion_pb2.GetItemStatsRequest(platform="office", limit=5),
    "/crossrec.ranking.v1.RankingService/UpsertItems": ranking_pb2.UpsertItemsRequest(items=[
        ranking_pb2.Item(item_id="raw-item", platform="office", title="red stapler",
                         attributes={"brand": "acme"})]),
    "/crossrec.ranking.v1.RankingService/DeleteItems":
        ranking_pb2.DeleteItemsRequest(platform="office", item_ids=["raw-item"]),
    "/crossrec.ranking.v1.RankingService/Recommend":
        ranking_pb2.RecommendRequest(user_id="raw-user", platform="office", k=3),
}


def mutations(template: bytes):
    """Random bytes, or the template with a few bytes overwritten, cut or garbage appended."""
    def apply(case):
        edits, cut, tail = case
        data = bytearray(template)
        for pos, value in edits:
            if data:
                data[pos % len(data)] = value
        return bytes(data[:cut if cut is not None else len(data)]) + tail

    return st.one_of(st.binary(max_size=256), st.tuples(
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
        st.one_of(st.none(), st.integers(0, max(1, len(template)))),
        st.binary(max_size=16)).map(apply))


@pytest.mark.parametrize("examples", [
    pytest.param(RAW_SHORT_EXAMPLES, id="short"),
    pytest.param(LONG_EXAMPLES, id="long", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", sorted(TEMPLATES), ids=lambda m: m.rsplit("/", 1)[1])
def test_raw_bytes_as_the_request_body_never_crash_a_server(stubs, method, examples):
    service = method.split(".")[1]
    channel = stubs["channels"][service]
    rpc = method.rsplit("/", 1)[1]
    if TEMPLATES[method] is None:
        template = TEMPLATES["/crossrec.fusion.v1.FusionService/Ingest"].SerializeToString()
        send = channel.stream_unary(method, request_serializer=None,
                                    response_deserializer=None)
        strategy = st.lists(mutations(template), min_size=1, max_size=3)

        def call(body):
            return send(iter(body), timeout=CALL_TIMEOUT_S)
    else:
        send = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        strategy = mutations(TEMPLATES[method].SerializeToString())

        def call(body):
            return send(body, timeout=CALL_TIMEOUT_S)

    def check(body):
        code, details, _, _ = rpc_outcome(call, body)
        answered_properly(f"{rpc} raw bytes", code, details)

    run_property(f"{rpc} raw bytes", examples, strategy, check)


# --- batches of 10^5 ------------------------------------------------------------------------
HUGE = 100_000
HUGE_TIMEOUT_S = 10.0
_EVENT = dict(event_id="", user_id="huge-user", platform="office", action=2, item_id="i",
              item_text="t", event_time_ms=NOW_MS)
HUGE_REQUESTS = {
    "Embed": ("embedding", lambda s: s["embedding"].Embed(
        embedding_pb2.EmbedRequest(texts=["t"] * HUGE), timeout=HUGE_TIMEOUT_S)),
    "Ingest": ("fusion", lambda s: s["fusion"].Ingest(fusion_pb2.IngestRequest(
        events=[pb_event(_EVENT)] * HUGE), timeout=HUGE_TIMEOUT_S)),
    "IngestStream": ("fusion", lambda s: s["fusion"].IngestStream(iter([fusion_pb2.IngestRequest(
        events=[pb_event(_EVENT)] * HUGE)]), timeout=HUGE_TIMEOUT_S)),
    "GetProfile": ("fusion", lambda s: s["fusion"].GetProfile(fusion_pb2.GetProfileRequest(
        user_id="huge-user", session_events=[pb_event(_EVENT)] * HUGE), timeout=HUGE_TIMEOUT_S)),
    "UpsertItems": ("ranking", lambda s: s["ranking"].UpsertItems(ranking_pb2.UpsertItemsRequest(
        items=[ranking_pb2.Item(item_id="huge", platform="office", title="t")] * HUGE),
        timeout=HUGE_TIMEOUT_S)),
    "DeleteItems": ("ranking", lambda s: s["ranking"].DeleteItems(ranking_pb2.DeleteItemsRequest(
        platform="office", item_ids=["huge"] * HUGE), timeout=HUGE_TIMEOUT_S)),
    "Recommend": ("ranking", lambda s: s["ranking"].Recommend(ranking_pb2.RecommendRequest(
        platform="office", k=10, session_events=[pb_event(_EVENT)] * HUGE),
        timeout=HUGE_TIMEOUT_S)),
}


@pytest.mark.parametrize("rpc", sorted(HUGE_REQUESTS))
def test_batches_of_ten_to_the_fifth_are_invalid_argument_within_the_deadline_and_survived(
        stack, stubs, rpc):
    service, call = HUGE_REQUESTS[rpc]
    pid = stack[service].proc.pid
    rss = [rss_kib(pid)]
    for _ in range(3):
        code, details, seconds, _ = rpc_outcome(call, stubs)
        rss.append(rss_kib(pid))
        assert code == INVALID and str(HUGE) in details, f"{code.name}: {details}"
    print(f"\n{rpc} with 10^5 entries, 3 times: {code.name} in {seconds:.2f} s; {service} RSS "
          f"MiB {' -> '.join(f'{r / 1024:.0f}' for r in rss)}: {details[:90]}")
    assert is_alive_and_serving(stack[service])


def test_a_request_over_the_message_size_limit_is_resource_exhausted(stack, stubs):
    code, details, _, _ = rpc_outcome(stubs["embedding"].Embed, embedding_pb2.EmbedRequest(
        texts=["x" * (17 * 1024 * 1024)]), timeout=CALL_TIMEOUT_S)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details
    assert is_alive_and_serving(stack["embedding"])


# --- contract edges, one example each ---------------------------------------------------------
def test_a_platform_with_a_trailing_newline_is_invalid_argument(stubs):
    nonce = next(NONCE)
    calls = {
        "GetItemStats": lambda: stubs["fusion"].GetItemStats(
            fusion_pb2.GetItemStatsRequest(platform="office\n"), timeout=CALL_TIMEOUT_S),
        "GetProfile": lambda: stubs["fusion"].GetProfile(fusion_pb2.GetProfileRequest(
            user_id="nl-user", for_platform="office\n"), timeout=CALL_TIMEOUT_S),
        "Ingest": lambda: stubs["fusion"].Ingest(fusion_pb2.IngestRequest(events=[pb_event(
            dict(_EVENT, user_id=f"nl-user-{nonce}", platform="office\n"))]),
            timeout=CALL_TIMEOUT_S),
        "UpsertItems": lambda: stubs["ranking"].UpsertItems(ranking_pb2.UpsertItemsRequest(
            items=[ranking_pb2.Item(item_id=f"nl-{nonce}", platform="office\n",
                                    title="red stapler")]), timeout=CALL_TIMEOUT_S),
    }
    answers = {rpc: rpc_outcome(call)[0].name for rpc, call in calls.items()}
    print(f"\nplatform 'office\\n': {answers}")
    assert answers == dict.fromkeys(calls, "INVALID_ARGUMENT")


@pytest.mark.parametrize("rpc", ["GetProfile", "DeleteUser"])
def test_a_user_id_over_128_bytes_is_invalid_argument(stubs, rpc):
    user_id = "u" * 129
    call = {"GetProfile": lambda: stubs["fusion"].GetProfile(
                fusion_pb2.GetProfileRequest(user_id=user_id), timeout=CALL_TIMEOUT_S),
            "DeleteUser": lambda: stubs["fusion"].DeleteUser(
                fusion_pb2.DeleteUserRequest(user_id=user_id), timeout=CALL_TIMEOUT_S)}[rpc]
    code, details, _, _ = rpc_outcome(call)
    assert code == INVALID and "user_id" in details, f"{code.name}: {details}"


def test_a_title_of_control_characters_is_rejected_naming_the_title(stubs):
    nonce = next(NONCE)
    code, details, _, _ = rpc_outcome(stubs["ranking"].UpsertItems, ranking_pb2.UpsertItemsRequest(
        items=[ranking_pb2.Item(item_id=f"ctl-{nonce}", platform="office", title="\x00\x01")]),
        timeout=CALL_TIMEOUT_S)
    print(f"\ntitle '\\x00\\x01': {code.name}: {details}")
    assert code == INVALID and "items[0].title" in details


def test_recommend_refuses_too_many_session_events_without_calling_fusion(stubs):
    code, details, _, _ = rpc_outcome(HUGE_REQUESTS["Recommend"][1], stubs)
    assert code == INVALID and "session_events" in details
    assert "fusion service" not in details, details


# --- one id rule for every RPC, visible texts, ratings ----------------------------------------
BAD_IDS = {"NUL": "a\x00b", "newline": "line\nbreak", "ANSI escape": "\x1b[31mred\x1b[0m",
           "lone zero-width space": "\u200b", "bidi override": "abc\u202edef"}


def id_calls(stubs, bad: str, nonce: int) -> dict:
    """RPC.field -> a call sending `bad` in that field and nothing else wrong."""
    event = dict(_EVENT, user_id=f"id-user-{nonce}", event_id=f"id-{nonce}")
    item = dict(item_id=f"id-item-{nonce}", platform="office", title="red stapler")
    fusion, ranking = stubs["fusion"], stubs["ranking"]

    def ingest(**changed):
        return lambda: fusion.Ingest(fusion_pb2.IngestRequest(events=[pb_event(
            dict(event, **changed))]), timeout=CALL_TIMEOUT_S)
    return {
        "Ingest.events[0].user_id": ingest(user_id=bad),
        "Ingest.events[0].item_id": ingest(item_id=bad),
        "Ingest.events[0].event_id": ingest(event_id=bad),
        "GetProfile.user_id": lambda: fusion.GetProfile(
            fusion_pb2.GetProfileRequest(user_id=bad), timeout=CALL_TIMEOUT_S),
        "DeleteUser.user_id": lambda: fusion.DeleteUser(
            fusion_pb2.DeleteUserRequest(user_id=bad), timeout=CALL_TIMEOUT_S),
        "Recommend.user_id": lambda: ranking.Recommend(ranking_pb2.RecommendRequest(
            user_id=bad, platform="office", k=3), timeout=CALL_TIMEOUT_S),
        "UpsertItems.items[0].item_id": lambda: ranking.UpsertItems(
            ranking_pb2.UpsertItemsRequest(items=[pb_item(dict(item, item_id=bad))]),
            timeout=CALL_TIMEOUT_S),
        "DeleteItems.item_ids[0]": lambda: ranking.DeleteItems(ranking_pb2.DeleteItemsRequest(
            platform="office", item_ids=[bad]), timeout=CALL_TIMEOUT_S),
    }


@pytest.mark.parametrize("bad", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_one_id_rule_for_every_rpc_invalid_argument_naming_the_field(stubs, bad):
    answers = {}
    for rpc_field, call in id_calls(stubs, bad, next(NONCE)).items():
        code, details, _, _ = rpc_outcome(call)
        answers[rpc_field] = code.name
        field = rpc_field.split(".", 1)[1]
        assert code == INVALID and field in details, f"{rpc_field}: {code.name}: {details}"
        assert bad not in details, f"{rpc_field} echoed the id back: {details!r}"
    print(f"\nid {bad!r}: {answers}")


@pytest.mark.parametrize("bad", ["", "x" * 129, "x" * 10_000_000], ids=["empty", "129-bytes",
                                                                       "10-megabytes"])
def test_delete_items_refuses_an_empty_or_oversized_id_naming_it(stubs, bad):
    code, details, _, _ = rpc_outcome(stubs["ranking"].DeleteItems, ranking_pb2.DeleteItemsRequest(
        platform="office", item_ids=["fine-id", bad]), timeout=CALL_TIMEOUT_S)
    assert code == INVALID and "item_ids[1]" in details, f"{code.name}: {details[:200]}"


def test_a_title_of_zero_width_characters_only_is_rejected_naming_the_title(stubs):
    nonce = next(NONCE)
    code, details, _, _ = rpc_outcome(stubs["ranking"].UpsertItems, ranking_pb2.UpsertItemsRequest(
        items=[ranking_pb2.Item(item_id=f"zw-{nonce}", platform="office",
                                title="\u200b\u200b\ufeff")]), timeout=CALL_TIMEOUT_S)
    assert code == INVALID and "items[0].title" in details, f"{code.name}: {details}"


@pytest.mark.parametrize("weight", [0.5, 6.0, 100.0])
def test_an_action_rate_weight_outside_1_to_5_is_invalid_argument(stubs, weight):
    nonce = next(NONCE)
    code, details, _, _ = rpc_outcome(stubs["fusion"].Ingest, fusion_pb2.IngestRequest(
        events=[pb_event(dict(_EVENT, user_id=f"rate-{nonce}", action=6, weight=weight))]),
        timeout=CALL_TIMEOUT_S)
    assert code == INVALID and "events[0].weight" in details, f"{code.name}: {details}"
    assert not profile_of(stubs, f"rate-{nonce}").known


@pytest.mark.parametrize("text", ["\x00", "\u200b", "\x01\u200d\ufeff"],
                         ids=["NUL", "zero-width", "control-and-format"])
def test_embed_refuses_a_text_that_is_empty_after_normalisation(stubs, text):
    code, details, _, _ = rpc_outcome(stubs["embedding"].Embed, embedding_pb2.EmbedRequest(
        texts=["red stapler", text]), timeout=CALL_TIMEOUT_S)
    assert code == INVALID and "texts[1]" in details, f"{code.name}: {details}"


# --- expensive requests: new texts per call are bounded ---------------------------------------
def test_recommend_with_100_session_events_of_new_2kb_texts_is_invalid_argument_at_once(stubs):
    nonce = next(NONCE)
    session = [pb_event(dict(_EVENT, user_id="", event_id=f"s-{nonce}-{i}",
                             item_id=f"s-{nonce}-{i}",
                             item_text=f"item {nonce} {i} " + "handmade paper " * 135))
               for i in range(100)]
    code, details, seconds, _ = rpc_outcome(stubs["ranking"].Recommend,
                                            ranking_pb2.RecommendRequest(
        platform="office", k=10, session_events=session), timeout=CALL_TIMEOUT_S)
    print(f"\nRecommend, 100 new 2 KB session texts: {code.name} in {seconds:.3f} s: {details}")
    assert code == INVALID and "session_events" in details and "at most 16" in details
