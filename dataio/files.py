"""CSV files by path: opening (.gz too), header checks, catalogue rows and the item texts
they embed to."""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from recmodel.text import compose_item_text

ITEM_BASE_COLUMNS = ("item_id", "platform", "title")


def open_csv(path: str | Path) -> TextIO:
    """The file as UTF-8 text for the csv module (gunzipped when it ends in .gz);
    FileNotFoundError naming it when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def csv_rows(f: TextIO, path: str | Path, required: tuple[str, ...] = ()) -> csv.DictReader:
    """The rows of an open CSV file as dicts by header name; ValueError naming the file and
    the columns when the header lacks any of `required`."""
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} in the header")
    return reader


def read_items_csv(path: str | Path) -> Iterator[dict]:
    """Catalogue rows of an items CSV (item_id, platform, title, then text columns), in file
    order: {item_id, platform, title, attributes: {column: text}}, empty texts left out."""
    with open_csv(path) as f:
        for row in csv_rows(f, path, ITEM_BASE_COLUMNS):
            yield {"item_id": row["item_id"], "platform": row["platform"], "title": row["title"],
                   "attributes": {k: v for k, v in row.items()
                                  if k not in ITEM_BASE_COLUMNS and k is not None and v}}


def item_texts_csv(path: str | Path) -> dict[tuple[str, str], str]:
    """{(platform, item_id): the text the item is embedded from} of an items CSV, composed
    as the ranking service composes it."""
    return {(r["platform"], r["item_id"]): compose_item_text(r["title"], r["attributes"])
            for r in read_items_csv(path)}
