"""The real interaction data in ../shared/data/<dataset>/ (never copied into the repo):
events.csv[.gz] and items.csv[.gz] per dataset, the layout of ../shared/data/README.md. A
dataset is named by its folder there, or given as a path to any folder in that layout."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

from dataio.files import csv_rows, item_texts_csv, open_csv, read_items_csv
from dataio.rows import to_event

AMAZON = "amazon-arts-office-urllm"
MOVIELENS = "movielens-1m"


def data_dir() -> Path:
    """$CROSSREC_DATA_DIR, else ../shared/data beside the repository."""
    env = os.environ.get("CROSSREC_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def dataset_dir(dataset: str) -> Path:
    """The folder of `dataset`: a path (it holds a "/") as given, else data_dir()/dataset."""
    return Path(dataset) if "/" in dataset else data_dir() / dataset


def dataset_name(dataset: str) -> str:
    """The name a dataset goes by in caches, meta.json and result files: its folder's name."""
    return Path(dataset).name if "/" in dataset else dataset


def dataset_file(dataset: str, name: str) -> Path:
    """dataset_dir(dataset)/name, or its .gz beside it when only that exists."""
    path = dataset_dir(dataset) / name
    gzipped = path.with_suffix(path.suffix + ".gz")
    return gzipped if not path.exists() and gzipped.exists() else path


def read_items(dataset: str = AMAZON) -> list[dict]:
    """Catalogue rows: {item_id, platform, title, attributes: {column: text}}."""
    return list(read_items_csv(dataset_file(dataset, "items.csv")))


def iter_events(dataset: str = AMAZON) -> Iterator[dict]:
    """Event rows as dicts of strings, in file order (per user, by seq_index or time)."""
    path = dataset_file(dataset, "events.csv")
    with open_csv(path) as f:
        yield from csv_rows(f, path)


def sample_titles(n: int, seed: int = 0, dataset: str = AMAZON) -> list[str]:
    """`n` distinct real item titles, a fixed random sample for a given seed."""
    titles = sorted({r["title"] for r in read_items(dataset)})
    return random.Random(seed).sample(titles, min(n, len(titles)))


def item_texts(dataset: str = AMAZON) -> dict[tuple[str, str], str]:
    """{(platform, item_id): the text an item is embedded from} for the whole catalogue."""
    return item_texts_csv(dataset_file(dataset, "items.csv"))


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
