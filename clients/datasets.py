"""Readers for the real interaction data in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import random
from pathlib import Path
from typing import Iterator

AMAZON = "amazon-arts-office-urllm"
MOVIELENS = "movielens-1m"
_ITEM_BASE_COLUMNS = ("item_id", "platform", "title")


def data_dir() -> Path:
    """$CROSSREC_DATA_DIR, else ../shared/data beside the repository."""
    env = os.environ.get("CROSSREC_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _open(path: Path):
    if not path.exists() and path.with_suffix(path.suffix + ".gz").exists():
        path = path.with_suffix(path.suffix + ".gz")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_items(dataset: str = AMAZON) -> list[dict]:
    """Catalogue rows: {item_id, platform, title, attributes: {column: text}}."""
    with _open(data_dir() / dataset / "items.csv") as f:
        rows = []
        for row in csv.DictReader(f):
            attrs = {k: v for k, v in row.items() if k not in _ITEM_BASE_COLUMNS and v}
            rows.append({"item_id": row["item_id"], "platform": row["platform"],
                         "title": row["title"], "attributes": attrs})
        return rows


def iter_events(dataset: str = AMAZON) -> Iterator[dict]:
    """Event rows as dicts of strings, in file order (per user, by seq_index or time)."""
    with _open(data_dir() / dataset / "events.csv") as f:
        yield from csv.DictReader(f)


def sample_titles(n: int, seed: int = 0, dataset: str = AMAZON) -> list[str]:
    """`n` distinct real item titles, a fixed random sample for a given seed."""
    titles = sorted({r["title"] for r in read_items(dataset)})
    return random.Random(seed).sample(titles, min(n, len(titles)))


# Amazon rows have no timestamps, only per-user order (seq_index): events are placed one
# minute apart from this fixed origin (2018-01-01 UTC), so order is kept and times are valid.
AMAZON_ORIGIN_MS = 1_514_764_800_000
ACTION_INTERACT, ACTION_RATE = 7, 6


def item_texts(dataset: str = AMAZON) -> dict[tuple[str, str], str]:
    """{(platform, item_id): the text an item is embedded from} for the whole catalogue."""
    from services.common.text import compose_item_text
    return {(r["platform"], r["item_id"]): compose_item_text(r["title"], r["attributes"])
            for r in read_items(dataset)}


def to_event(row: dict, texts: dict[tuple[str, str], str]) -> dict:
    """A data row as BehaviorEvent fields (the keyword arguments the engines validate)."""
    key = (row["platform"], row["item_id"])
    if row.get("timestamp"):
        time_ms = int(float(row["timestamp"]) * 1000)
        item_hash = hashlib.blake2b(row["item_id"].encode(), digest_size=6).hexdigest()
        event_id = f"{row['user_id']}:{time_ms}:{item_hash}"  # item ids may be non-ASCII
    else:
        time_ms = AMAZON_ORIGIN_MS + int(row["seq_index"]) * 60_000
        event_id = f"{row['user_id']}:{row['seq_index']}"
    action = row["rating_or_action"]
    rated = action.replace(".", "", 1).isdigit()
    return dict(event_id=event_id, user_id=row["user_id"], platform=row["platform"],
                action=ACTION_RATE if rated else ACTION_INTERACT, item_id=row["item_id"],
                item_text=texts.get(key, ""), event_time_ms=time_ms,
                weight=float(action) if rated else None)


def user_events(dataset: str = AMAZON, users: int | None = None,
                roles: tuple[str, ...] = ("history",)) -> dict[str, list[dict]]:
    """The first `users` users' events (file order), as BehaviorEvent fields, by user."""
    texts = item_texts(dataset)
    out: dict[str, list[dict]] = {}
    for row in iter_events(dataset):
        if row.get("role", "history") not in roles:
            continue
        if row["user_id"] not in out and users is not None and len(out) >= users:
            break
        out.setdefault(row["user_id"], []).append(to_event(row, texts))
    return out
