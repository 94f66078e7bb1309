"""A data row as a behaviour event: which column holds which field (EventColumns, by default
../shared/data's layout) and the one reading of a row's action, weight and time."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from recmodel.events import ACTION_INTERACT, ACTION_RATE, ACTIONS

# Rows without a time but with an order (Amazon's seq_index) are placed ORDER_STEP_MS apart
# from this fixed origin (2018-01-01 UTC), so order is kept and times are valid.
AMAZON_ORIGIN_MS = 1_514_764_800_000
ORDER_STEP_MS = 60_000
# Milliseconds per unit of a numeric time column.
TIME_UNITS_MS = {"s": 1000, "ms": 1}
_ACTION_BY_NAME = {name: number for number, name in ACTIONS.items()}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class EventColumns:
    """The CSV column of each event field; the defaults are ../shared/data's events.csv.

    `fixed_platform` / `fixed_action`: every row's platform / action, for a file without that
    column. `time` (in `time_unit`, or ISO 8601) or, where a row's time is empty, `order`
    (an integer) places the event; `weight`, `text`, `event_id`: optional columns (None: the
    action's default weight, the catalogue's item text, an id derived from the row)."""
    user: str = "user_id"
    item: str = "item_id"
    platform: str = "platform"
    action: str = "rating_or_action"
    time: str = "timestamp"
    order: str = "seq_index"
    weight: str | None = None
    text: str | None = None
    event_id: str | None = None
    time_unit: str = "s"
    fixed_platform: str | None = None
    fixed_action: str | None = None

    def required(self) -> tuple[str, ...]:
        """The columns a file's header must have (time and order are read where present)."""
        named = (self.user, None if self.fixed_platform else self.platform, self.item,
                 None if self.fixed_action else self.action, self.weight, self.text,
                 self.event_id)
        return tuple(c for c in named if c)


SHARED_COLUMNS = EventColumns()


def action_and_weight(value: str) -> tuple[int, float | None]:
    """The action column read as (Action number, weight; None: the action's default).

    A number is a rating (ACTION_RATE, weight = the number: validation refuses one outside
    1..5); an action name (view, click, like, add_to_cart, purchase, rate, interact; any case)
    is that action; any other text, empty included, is an interaction of unknown kind
    (ACTION_INTERACT: all of the Amazon data). ValueError for a rating that is not finite."""
    text = value.strip()
    try:
        rating = float(text)
    except ValueError:
        return _ACTION_BY_NAME.get(text.lower(), ACTION_INTERACT), None
    if not math.isfinite(rating):
        raise ValueError(f"a rating must be a finite number, got {value!r}")
    return ACTION_RATE, rating


def time_ms(value: str, unit: str = "s") -> int:
    """Milliseconds since the epoch of a time column's value: a number in `unit` (s, ms), or
    an ISO 8601 date and time (UTC unless it names an offset)."""
    try:
        number = float(value)
    except ValueError:
        stamp = datetime.fromisoformat(value.strip())
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
        return (stamp - _EPOCH) // timedelta(milliseconds=1)
    if not math.isfinite(number):
        raise ValueError(f"a time must be a finite number, got {value!r}")
    return int(number * TIME_UNITS_MS[unit])


def to_event(row: dict, texts: dict[tuple[str, str], str],
             columns: EventColumns = SHARED_COLUMNS) -> dict:
    """A data row as BehaviorEvent fields (the keyword arguments the engines validate, and
    the client's Event.of). Without an event id column the id is derived from the row: user,
    time and an item hash, else user and order, so a reload of the file dedupes. KeyError for
    a missing column, ValueError for a value that cannot be read."""
    c = columns
    user, item = row[c.user], row[c.item]
    platform = c.fixed_platform or row[c.platform]
    action, weight = action_and_weight(c.fixed_action or row[c.action])
    if c.weight and row[c.weight]:
        weight = float(row[c.weight])
    if row.get(c.time):
        event_time_ms = time_ms(row[c.time], c.time_unit)
        item_hash = hashlib.blake2b(item.encode(), digest_size=6).hexdigest()
        event_id = f"{user}:{event_time_ms}:{item_hash}"  # item ids may be non-ASCII
    elif row.get(c.order):
        event_time_ms = AMAZON_ORIGIN_MS + int(row[c.order]) * ORDER_STEP_MS
        event_id = f"{user}:{row[c.order]}"
    else:
        raise ValueError(f"no time ({c.time}) and no order ({c.order}) in the row")
    if c.event_id and row[c.event_id]:
        event_id = row[c.event_id]
    text = (c.text and row[c.text]) or texts.get((platform, item), "")
    return dict(event_id=event_id, user_id=user, platform=platform, action=action,
                item_id=item, item_text=text, event_time_ms=event_time_ms, weight=weight)
