"""Validation of what callers send, shared by fusion and ranking: ids and platforms (one rule
for every RPC), events (actions, times, weights, text; the value is recmodel.events.Event)
and catalogue items (titles, attributes)."""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Mapping, Sequence

from recmodel.events import ACTION_RATE, ACTIONS, DEFAULT_WEIGHT, MAX_RATING, MIN_RATING, Event
from recmodel.text import compose_item_text, has_visible_text, normalize_text
from services.common.errors import InvalidInput

PLATFORM_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_ID_BYTES = 128
MAX_FUTURE_MS = 24 * 3600 * 1000
MAX_WEIGHT = 100.0
MAX_BATCH_EVENTS = 1000   # events per Ingest call / IngestStream message
MAX_SESSION_EVENTS = 100  # session events per GetProfile / Recommend call
# Longer item text is refused; shorter text is normalised and cut to MAX_TEXT_CHARS.
MAX_RAW_TEXT_CHARS = 65536
MAX_BATCH_ITEMS = 1000  # items per UpsertItems call, ids per DeleteItems call
MAX_TITLE_CHARS = 2048
MAX_ATTRIBUTES, MAX_ATTRIBUTE_CHARS = 16, 2048


def check_id(value: str, field: str, required: bool = True) -> None:
    """The one id rule of every RPC (user, item and event ids): 1..MAX_ID_BYTES bytes of
    UTF-8, every character printable (no control, format or separator characters but the
    ASCII space: no NUL, newline, ANSI escape, zero-width or bidi character) and at least one
    that is not a space. InvalidInput names `field` and never echoes the value: an id that
    breaks the rule is exactly what should not reach a log or a terminal."""
    if not value:
        if required:
            raise InvalidInput(f"{field} is required, got an empty string")
        return
    # Characters first: a 10 MB id is refused without encoding it (bytes >= characters).
    if len(value) > MAX_ID_BYTES:
        raise InvalidInput(f"{field} must be at most {MAX_ID_BYTES} bytes, got {len(value)} "
                           "characters")
    size = len(value.encode("utf-8"))
    if size > MAX_ID_BYTES:
        raise InvalidInput(f"{field} must be at most {MAX_ID_BYTES} bytes, got {size}")
    for position, ch in enumerate(value):
        if not ch.isprintable():
            raise InvalidInput(f"{field} must hold printable characters only (no control, "
                               f"format or separator characters), got U+{ord(ch):04X} at "
                               f"position {position}")
    if not value.strip():
        raise InvalidInput(f"{field} must hold a character other than spaces")


def content_digest(platform: str, action: int, item_id: str, event_time_ms: int,
                   weight: float) -> str:
    """What an event says, as a short hash: platform, action, item, time as sent (0 stays 0,
    so a re-sent event without a time matches itself) and weight. The item text is not part
    of it: it describes the item, and an empty one means "the cached text"."""
    key = f"{platform}\x1f{action}\x1f{item_id}\x1f{event_time_ms}\x1f{float(weight)!r}"
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def event_digest(e: Event) -> str:
    """`e.digest`, or the digest of its stored fields for an event built without one."""
    return e.digest or content_digest(e.platform, e.action, e.item_id, e.event_time_ms,
                                      e.weight)


def check_platform(platform: str, field: str = "platform") -> None:
    if not PLATFORM_PATTERN.fullmatch(platform):  # match() would let a trailing "\n" in
        shown = platform if len(platform) <= 40 else platform[:40] + "..."
        raise InvalidInput(f"{field} must match {PLATFORM_PATTERN.pattern}, got {shown!r}")


def derived_event_id(user_id: str, platform: str, item_id: str, action: int,
                     event_time_ms: int) -> str:
    key = f"{user_id}\x1f{platform}\x1f{item_id}\x1f{action}\x1f{event_time_ms}"
    return "d:" + hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def validate_event(event_id: str, user_id: str, platform: str, action: int, item_id: str,
                   item_text: str, event_time_ms: int, weight: float | None, *, field: str,
                   now_ms: int | None = None, require_user: bool = True) -> Event:
    """Check one event's fields and return it normalised; InvalidInput names `field`.<name>.

    `weight` None means unset (the action's default). Time 0 means "now".
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    check_id(user_id, f"{field}.user_id", required=require_user)
    check_platform(platform, f"{field}.platform")
    if action not in ACTIONS:
        if action == 0:
            raise InvalidInput(f"{field}.action must be set, got ACTION_UNSPECIFIED")
        raise InvalidInput(f"{field}.action must be one of {sorted(ACTIONS)} "
                           f"({', '.join(ACTIONS.values())}), got {action}")
    check_id(item_id, f"{field}.item_id")
    if event_id:
        check_id(event_id, f"{field}.event_id")
        if not event_id.isascii() or not event_id.isprintable():
            raise InvalidInput(f"{field}.event_id must be printable ASCII")
    if event_time_ms < 0:
        raise InvalidInput(f"{field}.event_time_ms must be >= 0, got {event_time_ms}")
    if event_time_ms > now_ms + MAX_FUTURE_MS:
        raise InvalidInput(f"{field}.event_time_ms must be at most 24 h in the future "
                           f"(<= {now_ms + MAX_FUTURE_MS}), got {event_time_ms}")
    time_ms = event_time_ms or now_ms
    # A derived id uses the time as sent (0 when unset), never the receive time, so a retried
    # batch without ids dedupes instead of being stored twice.
    if weight is None:
        weight = DEFAULT_WEIGHT[action]
    elif not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise InvalidInput(f"{field}.weight must be in (0, {MAX_WEIGHT:g}], got {weight}")
    elif action == ACTION_RATE and not MIN_RATING <= weight <= MAX_RATING:
        raise InvalidInput(f"{field}.weight is the rating of an ACTION_RATE event and must be "
                           f"in {MIN_RATING:g}..{MAX_RATING:g}, got {weight}")
    if len(item_text) > MAX_RAW_TEXT_CHARS:
        raise InvalidInput(f"{field}.item_text must be at most {MAX_RAW_TEXT_CHARS} characters, "
                           f"got {len(item_text)}")
    text = normalize_text(item_text)
    if text and not has_visible_text(text):
        raise InvalidInput(f"{field}.item_text must be empty or hold a visible character, got "
                           "only zero-width, format or control characters")
    event_id = event_id or derived_event_id(user_id, platform, item_id, action, event_time_ms)
    return Event(event_id, user_id, platform, action, item_id, text, time_ms, float(weight),
                 content_digest(platform, action, item_id, event_time_ms, weight))


def validate_item(item_id: str, platform: str, title: str,
                  attributes: Mapping[str, str] | None = None, *, field: str
                  ) -> tuple[str, dict[str, str], str]:
    """Check one catalogue item's fields; (title stripped, attributes, the text its vector is
    embedded from: title and attribute values, recmodel.text.compose_item_text).
    InvalidInput names `field`.<name>."""
    check_id(item_id, f"{field}.item_id")
    check_platform(platform, f"{field}.platform")
    title = title.strip()
    if not title or len(title) > MAX_TITLE_CHARS:
        raise InvalidInput(f"{field}.title must hold 1..{MAX_TITLE_CHARS} characters, "
                           f"got {len(title)}")
    attrs = dict(attributes or {})
    if len(attrs) > MAX_ATTRIBUTES:
        raise InvalidInput(f"{field}.attributes must hold at most {MAX_ATTRIBUTES} entries, "
                           f"got {len(attrs)}")
    for key, value in attrs.items():
        if len(value) > MAX_ATTRIBUTE_CHARS or len(key) > MAX_ATTRIBUTE_CHARS:
            raise InvalidInput(f"{field}.attributes[{key[:40]!r}] must be at most "
                               f"{MAX_ATTRIBUTE_CHARS} characters")
    text = compose_item_text(title, attrs)
    if not has_visible_text(compose_item_text(title)):
        raise InvalidInput(f"{field}.title must hold visible text, got only whitespace, "
                           "control or zero-width characters")
    return title, attrs, text


def raw_event(e) -> dict:
    """Keyword arguments of validate_event from a crossrec.common.v1.BehaviorEvent message."""
    return dict(event_id=e.event_id, user_id=e.user_id, platform=e.platform, action=e.action,
                item_id=e.item_id, item_text=e.item_text, event_time_ms=e.event_time_ms,
                weight=e.weight if e.HasField("weight") else None)


class RawEvents(Sequence):
    """BehaviorEvent messages seen as validate_event keyword arguments, converted on access,
    so a batch refused for its size costs nothing to convert."""

    def __init__(self, messages):
        self._messages = messages

    def __len__(self) -> int:
        return len(self._messages)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [raw_event(m) for m in self._messages[index]]
        return raw_event(self._messages[index])
