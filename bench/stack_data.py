"""Real data for a benchmark's local stack: the catalogue and item vectors written where the
services open them, real users' events ingested, fresh copies of real events; and the load
tool's (tools/loadtest.py) arguments."""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import grpc

from crossrec.common.v1 import common_pb2
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from dataio import AMAZON, item_texts, read_items, user_events
from services.common.validation import validate_event
from tools.loadtest import Workload, parse_args
from tools.stack import ServiceProcess


def seed_stores(run_dir: Path, model_repo: str, n_items: int) -> int:
    """Write the catalogue (ranking) and the item-vector cache (fusion) where start_stack's
    services will open them, from the encoder's cached catalogue vectors. Items written."""
    from export.item_vectors import item_vectors
    from recmodel.text import compose_item_text
    from services.fusion.sqlite_store import SQLiteProfileStore
    from services.ranking.catalog import CatalogItem
    from services.ranking.sqlite_catalog import SQLiteCatalog
    keys, vectors = item_vectors(AMAZON, model_repo)
    row_of = {k: n for n, k in enumerate(keys)}
    rows = read_items(AMAZON)[:n_items or None]
    catalog = SQLiteCatalog(run_dir / "catalog.sqlite3", vectors.shape[1])
    for start in range(0, len(rows), 5000):
        chunk = rows[start:start + 5000]
        catalog.upsert([CatalogItem(r["item_id"], r["platform"], r["title"], r["attributes"],
                                    compose_item_text(r["title"], r["attributes"]))
                        for r in chunk],
                       vectors[[row_of[(r["platform"], r["item_id"])] for r in chunk]])
    catalog.close()
    store = SQLiteProfileStore(run_dir / "fusion.sqlite3")
    texts = item_texts(AMAZON)
    store.put_items({k: (texts[k], vectors[n]) for k, n in row_of.items()})
    store.close()
    print(f"  catalogue and item vectors written: {len(rows):,} items", flush=True)
    return len(rows)


def load_data(procs: dict[str, ServiceProcess], n_users: int, n_items: int,
              over_grpc: bool) -> Workload:
    """The first `n_users` users' events through fusion's IngestStream (and, `over_grpc`, the
    catalogue through ranking's UpsertItems first): the load tool's Workload of them."""
    if over_grpc:
        upsert_items(procs, n_items)
    users = user_events(AMAZON, users=n_users)
    started = time.perf_counter()
    with grpc.insecure_channel(procs["fusion"].address) as channel:
        reply = fusion_pb2_grpc.FusionServiceStub(channel).IngestStream(iter([
            fusion_pb2.IngestRequest(events=[common_pb2.BehaviorEvent(
                **{k: v for k, v in e.items() if v is not None}) for e in events])
            for events in users.values()]), timeout=600)
    print(f"  {len(users)} users ingested over gRPC: {reply.accepted:,} events in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    events = [e for es in users.values() for e in es]
    return Workload(list(users), events, ["arts_crafts", "office"])


def upsert_items(procs: dict[str, ServiceProcess], n_items: int) -> None:
    items = read_items(AMAZON)[:n_items or None]
    with grpc.insecure_channel(procs["ranking"].address) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        for start in range(0, len(items), 500):
            stub.UpsertItems(ranking_pb2.UpsertItemsRequest(items=[ranking_pb2.Item(
                item_id=r["item_id"], platform=r["platform"], title=r["title"],
                attributes=r["attributes"]) for r in items[start:start + 500]]), timeout=300)
            print(f"\r  catalogue {min(start + 500, len(items)):,}/{len(items):,}", end="",
                  flush=True)
    print()


def synthetic_stream(n: int, seed: int = 0):
    """n validated events: real Amazon events copied under fresh user and event ids."""
    users = list(user_events(AMAZON, users=500).values())
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        events = users[rng.randrange(len(users))]
        copy = f"b{len(out)}"
        for e in events:
            out.append(validate_event(**dict(e, user_id=f"{copy}:{e['user_id']}",
                                             event_id=f"{copy}:{e['event_id']}"), field="e"))
    return out[:n]


def load_args(**kw) -> argparse.Namespace:
    """tools/loadtest.py's arguments from keywords (concurrency=8 -> --concurrency 8)."""
    argv = []
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parse_args(argv)
