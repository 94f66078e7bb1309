"""Durable profile store: the `ProfileStore` interface its backends share, SQLiteProfileStore
(sqlite_store.py, the embedded default) and RedisProfileStore (redis_store.py).

Per user and platform the store keeps the newest RECENT_PER_PLATFORM events (what the user
model reads), the all-time event count and the last-seen time; per user, every event id ever
stored with a digest of its content (dedupe, conflicts); per (platform, item_id), the item
text and its vector (embedding cache).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from recmodel.events import Event

RECENT_PER_PLATFORM = 50

ItemKey = tuple[str, str]  # (platform, item_id)


@dataclass
class PlatformHistory:
    """A user's stored state on one platform; `events` oldest first, at most RECENT_PER_PLATFORM."""
    events: list[Event] = field(default_factory=list)
    count: int = 0
    last_seen_ms: int = 0


class ProfileStore(Protocol):
    """What the fusion engine needs from storage. Every method is thread-safe. The backends
    (and PseudonymousStore, pseudonym.py) subclass it: one that leaves a method out cannot be built.

    `timeout_s` on every method is the call's budget in seconds (None: the backend's own
    limits). Past it the method raises BudgetSpent instead of waiting on; a write cut short
    this way is not acknowledged but may still be applied, so re-sending it must be safe
    (event ids dedupe, item and delete writes are idempotent).
    """

    # The label of the backend's latency metric (crossrec_fusion_store_duration_seconds).
    backend: str

    @abc.abstractmethod
    def append(self, events: list[Event], timeout_s: float | None = None
               ) -> tuple[int, int, int]:
        """Store `events` atomically and durably; (accepted, duplicates, conflicts) once
        durable.

        Duplicates are events whose (user_id, event_id) is already stored or repeated within
        the batch; conflicts are the duplicates whose content digest (events.event_digest)
        differs from the stored (or first) one's, which is kept. Raises Overloaded when the
        write queue is full.
        """

    @abc.abstractmethod
    def history(self, user_id: str, timeout_s: float | None = None
                ) -> dict[str, PlatformHistory]:
        """The user's state per platform; empty for an unknown user. Event texts are empty:
        texts and vectors live in the item cache (get_items)."""

    @abc.abstractmethod
    def delete_user(self, user_id: str, timeout_s: float | None = None) -> int:
        """Remove the user's events, ids and stats; number of events the user had (0: unknown).
        What stays on disk, and for how long, is the backend's to state (README)."""

    @abc.abstractmethod
    def get_items(self, keys: list[ItemKey], timeout_s: float | None = None
                  ) -> dict[ItemKey, tuple[str, np.ndarray]]:
        """Cached (text, float32 vector) for the keys that are cached."""

    @abc.abstractmethod
    def put_items(self, items: dict[ItemKey, tuple[str, np.ndarray]],
                  timeout_s: float | None = None) -> None:
        """Cache item texts and vectors durably (replacing older ones)."""

    @abc.abstractmethod
    def item_stats(self, platform: str, limit: int, timeout_s: float | None = None
                   ) -> list[tuple[str, int, int]]:
        """(item_id, event count, last event ms) of the `limit` items of `platform` with the
        most stored events, most first."""

    def close(self) -> None:  # noqa: B027 - an optional hook: nothing to release by default
        """Flush and release; later calls fail."""
