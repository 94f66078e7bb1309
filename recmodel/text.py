"""Text normalisation shared by every service, so one item text always embeds the same way."""

import re
import unicodedata

MAX_TEXT_CHARS = 2048
# C0/C1 control characters except tab and newline, which become spaces anyway.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACE = re.compile(r"\s+")


def normalize_text(text: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """NFC, control characters removed, whitespace collapsed, cut to `max_chars` characters."""
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    text = _SPACE.sub(" ", text).strip()
    return text[:max_chars]


def has_visible_text(text: str) -> bool:
    """Whether `text` holds a character that shows: anything but whitespace, control (Cc),
    format (Cf: zero-width space, joiners, BOM, bidi marks), unassigned, private-use and
    surrogate code points. A text without one embeds to a vector of nothing."""
    return any(not ch.isspace() and unicodedata.category(ch)[0] not in "CZ" for ch in text)


def compose_item_text(title: str, attributes: dict[str, str] | None = None) -> str:
    """The text an item is embedded from: its title, then its attribute values in key order.

    Attribute keys are sorted so the same item always yields the same text (and vector).
    """
    parts = [title] + [attributes[k] for k in sorted(attributes or {}) if attributes[k]]
    return normalize_text(" ; ".join(p for p in parts if p))
