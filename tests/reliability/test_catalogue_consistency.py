"""The catalogue under random upserts and deletes, repeated ids within one batch included:
the engine's answers, the catalogue's items and the index's live rows always agree with a
plain dict model (last one wins), also across a restart, on the SQLite and the Redis
catalogue. And the defect as it was found, over gRPC: `a` "red", `a` "blue", `b`, `c` in one
UpsertItems answered `upserted: 4` and Recommend then listed `[b, a, a]`.

The property runs in-process on RankingEngine with a deterministic fake embedder (a vector
per text), so that hundreds of operations cost milliseconds; the gRPC case uses the stack.
"""

from __future__ import annotations

import hashlib
import uuid

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from services.ranking.sqlite_catalog import SQLiteCatalog
from recmodel.ranker import RetrievalOrder
from services.ranking.engine import Popularity, RankingEngine

DIM = 8
EXAMPLES = 40
PLATFORMS = ("office", "arts_crafts")
IDS = ("a", "b", "c", "d", "e")
TITLES = ("red stapler", "blue stapler", "glue", "paint set", "notebook")


def fake_embed(texts, budget_s=None) -> np.ndarray:
    """A unit vector per text, the same for the same text."""
    rows = []
    for text in texts:
        seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
        v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        rows.append(v / np.linalg.norm(v))
    return np.asarray(rows, np.float32).reshape(len(texts), DIM)


def engine_on(catalog) -> RankingEngine:
    return RankingEngine(catalog, fake_embed, profile=None, ranker=RetrievalOrder(),
                         popularity=Popularity(lambda p: [], catalog, 3600))


item = st.fixed_dictionaries(dict(platform=st.sampled_from(PLATFORMS),
                                  item_id=st.sampled_from(IDS), title=st.sampled_from(TITLES)))
operation = st.one_of(
    st.tuples(st.just("upsert"), st.lists(item, min_size=1, max_size=6)),
    st.tuples(st.just("delete"), st.sampled_from(PLATFORMS),
              st.lists(st.sampled_from(IDS), min_size=1, max_size=4)),
    st.tuples(st.just("restart")))


def agree(catalog, model: dict) -> None:
    """The catalogue's items, its index's live rows and a search over everything match the
    model {(platform, item_id): title}, with no id twice."""
    for platform in PLATFORMS:
        expected = {i: t for (p, i), t in model.items() if p == platform}
        assert sorted(catalog.item_ids(platform)) == sorted(expected)
        assert catalog.size(platform) == len(expected)
        for item_id, title in expected.items():
            assert catalog.get(platform, item_id).title == title
        index = catalog.index(platform)
        if index is None:
            assert not expected
            continue
        snapshot = index.snapshot()
        assert sorted(snapshot.row_of) == sorted(expected)
        assert int(snapshot.alive.sum()) == len(expected)
        for item_id, title in expected.items():
            np.testing.assert_array_equal(snapshot.vectors[snapshot.row_of[item_id]],
                                          fake_embed([title])[0])
        found, _ = index.search(np.ones(DIM, np.float32), k=len(IDS) + 5)
        assert sorted(found) == sorted(expected), f"search listed {found}"


def check_sequence(open_catalog, operations) -> None:
    catalog = open_catalog()
    engine = engine_on(catalog)
    model: dict[tuple[str, str], str] = {}
    try:
        for op in operations:
            if op[0] == "upsert":
                batch = [dict(r, attributes={}) for r in op[1]]
                last = {(r["platform"], r["item_id"]): r["title"] for r in batch}
                assert engine.upsert_items(batch) == len(last)
                model.update(last)
            elif op[0] == "delete":
                _, platform, ids = op
                gone = {i for i in ids if (platform, i) in model}
                assert engine.delete_items(platform, ids) == len(gone)
                for i in gone:
                    del model[(platform, i)]
            else:
                catalog.close()
                catalog = open_catalog()
                engine = engine_on(catalog)
            agree(catalog, model)
        catalog.close()
        catalog = open_catalog()
        agree(catalog, model)
    finally:
        catalog.close()


def run_property(open_factory) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(operation, min_size=1, max_size=8))
    def prop(operations):
        check_sequence(open_factory(), operations)
    prop()


def test_sqlite_catalogue_index_and_engine_agree_with_a_dict_under_random_upserts(tmp_path):
    def factory():
        path = tmp_path / f"catalog-{uuid.uuid4().hex[:8]}.sqlite3"
        return lambda: SQLiteCatalog(path, DIM, "exact")
    run_property(factory)


def test_redis_catalogue_index_and_engine_agree_with_a_dict_under_random_upserts(redis_url):
    from services.ranking.redis_catalog import RedisCatalog

    def factory():
        prefix = f"prop-{uuid.uuid4().hex[:10]}"
        return lambda: RedisCatalog(redis_url, DIM, "exact", prefix=prefix, tail_block_s=0.1)
    run_property(factory)


def test_a_repeated_id_in_one_upsert_keeps_the_last_and_recommend_lists_each_item_once(stack):
    platform = f"dup_{uuid.uuid4().hex[:8]}"
    items = [ranking_pb2.Item(item_id="a", platform=platform, title="red heavy duty stapler"),
             ranking_pb2.Item(item_id="a", platform=platform, title="blue heavy duty stapler"),
             ranking_pb2.Item(item_id="b", platform=platform, title="glue sticks 12 pack"),
             ranking_pb2.Item(item_id="c", platform=platform, title="spiral notebook a5")]
    with grpc.insecure_channel(stack["ranking"].address) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        reply = stub.UpsertItems(ranking_pb2.UpsertItemsRequest(items=items), timeout=30)
        recs = stub.Recommend(ranking_pb2.RecommendRequest(user_id="nobody-dup",
                                                           platform=platform, k=10), timeout=10)
        stub.DeleteItems(ranking_pb2.DeleteItemsRequest(platform=platform,
                                                        item_ids=["a", "b", "c"]), timeout=10)
    listed = [(r.item_id, r.title) for r in recs.items]
    print(f"\nupsert a, a, b, c: upserted {reply.upserted}; Recommend: {listed}")
    assert reply.upserted == 3
    assert sorted(i for i, _ in listed) == ["a", "b", "c"]
    assert dict(listed)["a"] == "blue heavy duty stapler"


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_restart_right_after_a_batch_with_repeats_keeps_the_last(backend, tmp_path, request):
    if backend == "sqlite":
        path = tmp_path / "c.sqlite3"

        def open_catalog():
            return SQLiteCatalog(path, DIM, "exact")
    else:
        from services.ranking.redis_catalog import RedisCatalog
        url, prefix = request.getfixturevalue("redis_url"), f"rs-{uuid.uuid4().hex[:10]}"

        def open_catalog():
            return RedisCatalog(url, DIM, "exact", prefix=prefix, tail_block_s=0.1)
    check_sequence(open_catalog, [
        ("upsert", [dict(platform="office", item_id="a", title="red stapler"),
                    dict(platform="office", item_id="a", title="blue stapler"),
                    dict(platform="office", item_id="b", title="glue"),
                    dict(platform="office", item_id="a", title="notebook")]),
        ("restart",), ("delete", "office", ["a", "a"]),
        ("upsert", [dict(platform="office", item_id="a", title="glue")])])
