"""Readers for the real interaction data in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import csv
import gzip
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
