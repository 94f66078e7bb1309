"""`make demo`: start the three services on loopback, load a real dataset's catalogue (the
Amazon Arts/Office data unless --dataset names another, e.g. movielens-1m) and a set of real
users' events over gRPC, and print recommendations for one user on each of their platforms,
then, where they have two or more, for the same user with the target platform's history
hidden."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc
from tqdm import tqdm

from clients.crossrec_client import FusionClient
from crossrec.common.v1 import common_pb2
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from dataio import AMAZON, dataset_name, read_items, user_events
from tools.stack import start_stack

SOURCES = {1: "personalised", 2: "cross-platform", 3: "popularity fallback"}


def progress_bar(label: str, total: int, unit: str) -> tqdm:
    """A progress bar on stderr, shown on a terminal only."""
    return tqdm(total=total, desc=f"  {label}", unit=unit, disable=None)


def load_catalog(ranking, items: list[dict], batch: int = 500) -> None:
    with progress_bar("catalogue items", len(items), "item") as bar:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            ranking.UpsertItems(ranking_pb2.UpsertItemsRequest(items=[
                ranking_pb2.Item(item_id=r["item_id"], platform=r["platform"], title=r["title"],
                                 attributes=r["attributes"]) for r in chunk]), timeout=300)
            bar.update(len(chunk))


def load_events(fusion_address: str, users: dict[str, list[dict]]) -> None:
    total = sum(len(e) for e in users.values())
    with FusionClient(fusion_address, timeout_s=600) as fusion, \
            progress_bar("events acknowledged", total, "event") as bar:
        result = fusion.ingest_stream(
            (e for events in users.values() for e in events),
            progress=lambda r: bar.update(r.events - bar.n))
    print(f"  {result.accepted:,} events stored, {result.duplicates:,} already there")


def show(ranking, user: str, platform: str, title: str, k: int = 5) -> None:
    reply = ranking.Recommend(ranking_pb2.RecommendRequest(
        user_id=user, platform=platform, k=k, exclude_seen=True), timeout=10)
    weights = ", ".join(f"{p} {w:.0%}" for p, w in sorted(reply.platform_weights.items()))
    print(f"\n{title}\n  source: {SOURCES.get(reply.source, '?')}; platform shares: {weights}")
    for n, item in enumerate(reply.items, 1):
        print(f"  {n}. [{item.score:6.3f}] {item.title[:80]}")
        print(f"       why: {item.explanation}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default="var/run")
    parser.add_argument("--model-repo", default=os.environ.get("CROSSREC_MODEL_REPO", "models"))
    parser.add_argument("--users", type=int, default=600, help="real users whose events to load")
    parser.add_argument("--dataset", default=AMAZON,
                        help="a dataset of ../shared/data, or a path to one in that layout")
    args = parser.parse_args(argv)

    print("starting embedding, fusion and ranking on 127.0.0.1 ...")
    procs = start_stack(Path(args.run_dir), args.model_repo)
    for name, proc in procs.items():
        print(f"  {name:10s} SERVING on {proc.address}")
    try:
        with grpc.insecure_channel(procs["ranking"].address) as rch, \
                grpc.insecure_channel(procs["fusion"].address) as fch:
            ranking = ranking_pb2_grpc.RankingServiceStub(rch)
            fusion = fusion_pb2_grpc.FusionServiceStub(fch)
            items = read_items(args.dataset)
            print(f"loading the real {dataset_name(args.dataset)} catalogue "
                  f"({len(items):,} items)")
            load_catalog(ranking, items)
            users = user_events(args.dataset, users=args.users)
            print(f"ingesting the history of {len(users)} real users")
            load_events(procs["fusion"].address, users)
            time.sleep(11)  # let ranking re-read item popularity once

            user, events = max(list(users.items())[-50:], key=lambda kv: len(kv[1]))
            platforms = sorted({e["platform"] for e in events})
            print(f"\nuser {user}: {len(events)} events; newest on each platform:")
            for platform in platforms:
                mine = [e for e in events if e["platform"] == platform]
                print(f"  {platform:12s} {len(mine):3d} events, e.g. "
                      f"'{mine[-1]['item_text'][:70]}'")
            for platform in reversed(platforms):
                show(ranking, user, platform, f"recommended on {platform}:")
            target = platforms[-1]
            if len(platforms) > 1:
                hidden = f"{user}-no-{target}"
                fusion.Ingest(fusion_pb2.IngestRequest(events=[
                    common_pb2.BehaviorEvent(**{k: v for k, v in dict(e, user_id=hidden).items()
                                                if v is not None})
                    for e in events if e["platform"] != target]), timeout=60)
                show(ranking, hidden, target, f"recommended on {target} with the {target} "
                     "history hidden (cross-platform):")
            show(ranking, "someone-new", target, "a user unknown everywhere:", k=3)
    finally:
        codes = {name: p.stop() for name, p in reversed(list(procs.items()))}
        print(f"\nservices stopped: {codes}")
    return 0 if set(codes.values()) == {0} else 1


if __name__ == "__main__":
    sys.exit(main())
