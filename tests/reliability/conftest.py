"""Fixtures of the reliability suite: one stack of the three services for the whole package,
with a small real catalogue (50 items) and three real users' histories."""

from __future__ import annotations

import grpc
import pytest

from tools.stack import start_stack
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from dataio import AMAZON, read_items
from tests.reliability.support import pb_event, pb_item

PLATFORMS = ("arts_crafts", "office")
ITEMS_PER_PLATFORM = 25
KNOWN_USERS = 3


@pytest.fixture(scope="session")
def catalogue_items() -> list[dict]:
    """The first 25 real items of each platform."""
    items, per = [], {p: 0 for p in PLATFORMS}
    for row in read_items(AMAZON):
        if per.get(row["platform"], ITEMS_PER_PLATFORM) < ITEMS_PER_PLATFORM:
            per[row["platform"]] += 1
            items.append(row)
    return items


@pytest.fixture(scope="package")
def stack(model_repo, tmp_path_factory, catalogue_items, amazon_users):
    """embedding, fusion (SQLite) and ranking on loopback, catalogue loaded, users ingested.
    Tests that freeze or stop one of these must leave it as they found it."""
    procs = start_stack(tmp_path_factory.mktemp("reliability"), str(model_repo))
    try:
        with grpc.insecure_channel(procs["ranking"].address) as channel:
            ranking_pb2_grpc.RankingServiceStub(channel).UpsertItems(
                ranking_pb2.UpsertItemsRequest(items=[pb_item(r) for r in catalogue_items]),
                timeout=120)
        with grpc.insecure_channel(procs["fusion"].address) as channel:
            fusion = fusion_pb2_grpc.FusionServiceStub(channel)
            for events in list(amazon_users.values())[:KNOWN_USERS]:
                fusion.Ingest(fusion_pb2.IngestRequest(events=[pb_event(e) for e in events]),
                              timeout=60)
        yield procs
    finally:
        codes = {name: p.stop() for name, p in reversed(list(procs.items()))}
    assert set(codes.values()) == {0}, f"unclean exits: {codes}"


@pytest.fixture(scope="package")
def known_users(amazon_users) -> list[str]:
    """Users whose history the stack holds."""
    return list(amazon_users)[:KNOWN_USERS]
