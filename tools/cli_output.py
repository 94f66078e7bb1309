"""What the `crossrec` CLI shows: exit codes, JSON, aligned tables, progress bars."""

from __future__ import annotations

import json
from dataclasses import fields, is_dataclass
from datetime import datetime, timezone
from enum import Enum

import numpy as np
from tqdm import tqdm

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def plain(value):
    """JSON-ready form of client values: dataclasses, enums, numpy arrays."""
    if is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def print_json(value) -> None:
    print(json.dumps(plain(value), indent=2, ensure_ascii=False))


def table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    """Columns padded to their widest cell; the last column is never padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths))]
        out[-1] = cells[-1]
        return "  ".join(out).rstrip()
    return "\n".join(line(r) for r in [header, *rows])


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def progress_bar(label: str, unit: str) -> tqdm:
    """A progress bar on stderr for a load of unknown length: on a terminal only (the summary
    on stdout says what was done)."""
    return tqdm(desc=label, unit=unit, unit_scale=True, disable=None)
