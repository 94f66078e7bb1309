"""Pseudonymous user ids at rest: a ProfileStore wrapper that stores every user id as its
keyed hash (HMAC-SHA-256 under a secret key, `--user-id-key-file`), so a copy of the database
or the Redis AOF alone does not say whose events it holds.

The API is unchanged: callers send and get back their own ids. Only this wrapper sees both
forms; the backends, their files and their keys hold the hash (64 hex characters). DeleteUser
hashes the id it is given and deletes that. The key must stay the same for the life of the
store: another key, or turning the option on or off over existing data, makes every earlier
user unknown (their events stay under the other form until deleted by it).

Event ids the server derived (no event_id sent, "d:" + a hash that includes the raw user id)
are stored keyed as well: with the item, action and time beside them in the same row, the
plain derivation would let anyone with a list of candidate ids test them without the key.
Event ids a client chose are stored as sent (they should not embed user ids).

What it does not hide: item ids and texts, times, and the shape of a user's history; and
anyone holding the key (or able to call the service) can test a guessed id.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace

import numpy as np

from recmodel.events import Event
from services.fusion.store import ItemKey, PlatformHistory, ProfileStore

# A shorter key is refused at start: HMAC-SHA-256 wants a random key of 32 bytes or so.
MIN_KEY_CHARS = 16
DERIVED = "d:"  # events.derived_event_id's prefix


class PseudonymousStore(ProfileStore):
    """`inner` with user ids replaced by HMAC-SHA-256(key, user id) hex on the way in and
    restored on the way out. Thread-safe as `inner` is."""

    def __init__(self, inner: ProfileStore, key: bytes):
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"the user id key must hold at least {MIN_KEY_CHARS} bytes")
        self.inner = inner
        self._key = key
        self.backend = inner.backend

    def pseudonym(self, user_id: str) -> str:
        """The form `user_id` is stored under."""
        return hmac.new(self._key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()

    def _event_id(self, event_id: str) -> str:
        if not event_id.startswith(DERIVED):
            return event_id
        return DERIVED + hmac.new(self._key, event_id.encode(), hashlib.sha256).hexdigest()[:32]

    def append(self, events: list[Event], timeout_s: float | None = None
               ) -> tuple[int, int, int]:
        names: dict[str, str] = {}
        hidden = [replace(e, user_id=names.setdefault(e.user_id, self.pseudonym(e.user_id)),
                          event_id=self._event_id(e.event_id)) for e in events]
        return self.inner.append(hidden, timeout_s=timeout_s)

    def history(self, user_id: str, timeout_s: float | None = None
                ) -> dict[str, PlatformHistory]:
        stored = self.inner.history(self.pseudonym(user_id), timeout_s=timeout_s)
        return {platform: PlatformHistory([replace(e, user_id=user_id) for e in h.events],
                                          h.count, h.last_seen_ms)
                for platform, h in stored.items()}

    def delete_user(self, user_id: str, timeout_s: float | None = None) -> int:
        return self.inner.delete_user(self.pseudonym(user_id), timeout_s=timeout_s)

    def get_items(self, keys: list[ItemKey], timeout_s: float | None = None
                  ) -> dict[ItemKey, tuple[str, np.ndarray]]:
        return self.inner.get_items(keys, timeout_s=timeout_s)

    def put_items(self, items: dict[ItemKey, tuple[str, np.ndarray]],
                  timeout_s: float | None = None) -> None:
        self.inner.put_items(items, timeout_s=timeout_s)

    def item_stats(self, platform: str, limit: int, timeout_s: float | None = None
                   ) -> list[tuple[str, int, int]]:
        return self.inner.item_stats(platform, limit, timeout_s=timeout_s)

    def close(self) -> None:
        self.inner.close()
