"""Fusion engine: validates and stores behaviour events, and fuses a user's history on every
platform into user vectors (per platform, overall, and as seen by one platform)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from services.common import metrics
from services.common.deadlines import downstream_deadline, time_left
from services.common.errors import InvalidInput
from recmodel.events import Event
from services.common.validation import (MAX_BATCH_EVENTS, MAX_SESSION_EVENTS, check_id,
                                        check_platform, validate_event)
from recmodel.user_model import UserVectors, Window, encode_user
from services.fusion.store import ItemKey, ProfileStore

log = logging.getLogger("crossrec.fusion")

MAX_RECENT_EVENTS = 200
# Distinct session items per GetProfile/Recommend whose text must be embedded during the call
# (no stored or recently seen vector): each costs the embedding service up to ~27 ms (a 2 KB
# text), and 100 of them once made one Recommend cost 2.7 s instead of ~14 ms.
MAX_NEW_SESSION_TEXTS = 16

# (texts, budget_s) -> float32 [n, dim] L2-normalised vectors
EmbedFn = Callable[[list[str], "float | None"], np.ndarray]


@dataclass
class PlatformView:
    platform: str
    vector: np.ndarray
    event_count: int
    last_seen_ms: int
    fusion_weight: float


@dataclass
class Profile:
    """A user's fused state. Vectors are float32 [dim], L2-normalised; None when unknown."""
    user_id: str
    known: bool
    dim: int
    platforms: list[PlatformView] = field(default_factory=list)
    fused: np.ndarray | None = None
    for_platform: str = ""
    for_platform_vector: np.ndarray | None = None
    total_events: int = 0
    # (event, item vector, weight in the for_platform (else fused) vector), newest first
    recent: list[tuple[Event, np.ndarray, float]] = field(default_factory=list)


class ItemCache:
    """The store's item texts and vectors in memory, for a store this process alone writes
    (SQLite): every profile read needs the vectors of up to 50 events per platform, and a
    store query for them cost more than the user model. Bounded, least recently used out;
    thread-safe.

    Coherence: writers call `write` (or `drop` when a write's outcome is unknown) after the
    store; a reader fills what it read from the store only if no write came in since it began
    (`generation`), so a slow reader never puts back a text a writer has just replaced.
    """

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._items: OrderedDict[ItemKey, tuple[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.generation = 0

    def get(self, keys: list[ItemKey]) -> tuple[dict[ItemKey, tuple[str, np.ndarray]],
                                                 list[ItemKey]]:
        """({key: (text, vector)} of the keys held, [keys not held])."""
        found, missing = {}, []
        with self._lock:
            items = self._items
            for key in keys:
                hit = items.get(key)
                if hit is None:
                    missing.append(key)
                else:
                    items.move_to_end(key)
                    found[key] = hit
        return found, missing

    def fill(self, read: dict[ItemKey, tuple[str, np.ndarray]], since: int) -> None:
        """Keep what a reader read from the store, unless a write came in since `since`."""
        with self._lock:
            if self.generation == since:
                self._put(read)

    def write(self, items: dict[ItemKey, tuple[str, np.ndarray]]) -> None:
        # Own copies: a vector may be a row of a whole embedding batch, kept alive otherwise.
        items = {k: (text, np.array(vec, np.float32)) for k, (text, vec) in items.items()}
        with self._lock:
            self.generation += 1
            self._put(items)

    def drop(self, keys) -> None:
        with self._lock:
            self.generation += 1
            for key in keys:
                self._items.pop(key, None)

    def _put(self, items) -> None:
        self._items.update(items)
        for key in items:
            self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)


class UserVectorCache:
    """encode_user's answers by a digest of everything the model reads (item vectors,
    platforms, actions, weights, the target platform), so a user whose window did not change
    since the last profile costs no model call, and the answer is the model's own, bit for bit.
    Keyed by content, it needs no invalidation: a new event, a changed item text (so vector)
    or a session event changes the key, whichever store or replica wrote it. Bounded, least
    recently used out; thread-safe. Its arrays are read-only: answers share them."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._entries: OrderedDict[bytes, UserVectors] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(window: Window, for_platform: str) -> bytes:
        # The event count first: every field after it then has a length it determines.
        digest = hashlib.sha256(len(window.events).to_bytes(4, "little"))
        digest.update(np.ascontiguousarray(window.vectors, np.float32))
        digest.update(window.weights())
        digest.update(np.asarray([e.action for e in window.events], np.int64))
        digest.update("\x1f".join([for_platform, *(e.platform for e in window.events)])
                      .encode())
        return digest.digest()

    def encode(self, model, window: Window, for_platform: str) -> UserVectors:
        key = self.key(window, for_platform)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
        metrics.FUSION_USER_VECTOR_CACHE.labels("hit" if hit is not None else "miss").inc()
        if hit is not None:
            return hit
        user = encode_user(model, window, for_platform)
        for array in (user.fused, user.for_platform, user.fused_weights,
                      user.for_platform_weights, *user.per_platform.values()):
            if array is not None:
                array.flags.writeable = False
        with self._lock:
            self._entries[key] = user
            while len(self._entries) > self.max_items:
                self._entries.popitem(last=False)
        return user


class FusionEngine:
    """Plain-Python core of the fusion service (no grpc). Thread-safe.

    `item_cache_items` > 0 keeps that many item vectors in memory (ItemCache); only for a
    store no other process writes, since another writer's changes would not reach the cache.
    `session_cache_items` > 0 keeps that many vectors of session items the store does not
    hold (texts embedded for a GetProfile, never stored), so that a repeated session costs
    no embedding; `max_new_session_texts` bounds the texts one call may embed.
    """

    def __init__(self, store: ProfileStore, embed: EmbedFn, model, dim: int,
                 item_cache_items: int = 0, session_cache_items: int = 0,
                 max_new_session_texts: int = MAX_NEW_SESSION_TEXTS,
                 user_vector_cache_items: int = 0):
        self.store = store
        self.embed = embed
        self.model = model
        self.dim = dim
        self.backend = store.backend
        self.items = ItemCache(item_cache_items) if item_cache_items > 0 else None
        self.session_items = (ItemCache(session_cache_items) if session_cache_items > 0
                              else None)
        self.max_new_session_texts = max_new_session_texts
        self.user_vectors = (UserVectorCache(user_vector_cache_items)
                             if user_vector_cache_items > 0 else None)

    def _stored_items(self, keys: list[ItemKey], deadline: float | None
                      ) -> dict[ItemKey, tuple[str, np.ndarray]]:
        """Stored (text, vector) of the keys the store holds, through the item cache."""
        if self.items is None:
            return self.store.get_items(keys, timeout_s=time_left(deadline,
                                                                  "item vectors were read"))
        since = self.items.generation
        found, missing = self.items.get(keys)
        if missing:
            read = self.store.get_items(missing, timeout_s=time_left(
                deadline, "item vectors were read"))
            self.items.fill(read, since)
            found.update(read)
        return found

    def _put_items(self, items: dict[ItemKey, tuple[str, np.ndarray]],
                   deadline: float | None) -> None:
        try:
            self.store.put_items(items, timeout_s=time_left(
                deadline, "new item vectors were cached; no event was stored"))
        except BaseException:
            if self.items is not None:  # the write may or may not have landed
                self.items.drop(items)
            raise
        if self.items is not None:
            self.items.write(items)

    # --- ingest ---------------------------------------------------------------------------
    def validate(self, raw: Sequence[dict], field_name: str, require_user: bool = True,
                 limit: int = MAX_BATCH_EVENTS) -> list[Event]:
        """Validate every event (all-or-nothing); InvalidInput names `field_name`[i].field."""
        if not raw and require_user:
            raise InvalidInput(f"{field_name} must hold at least 1 event, got 0")
        if len(raw) > limit:
            raise InvalidInput(f"{field_name} must hold at most {limit} events, got {len(raw)}")
        now_ms = int(time.time() * 1000)
        return [validate_event(**r, field=f"{field_name}[{i}]", now_ms=now_ms,
                               require_user=require_user) for i, r in enumerate(raw)]

    def _item_vectors(self, events: list[Event], field_name: str, deadline: float | None,
                      cache_new: bool) -> tuple[list[Event], dict[ItemKey, np.ndarray]]:
        """Fill empty texts from the cache and get a vector per item, embedding only items
        whose text is new or changed, every call done by `deadline` (monotonic s, None: no
        limit). Returns (events with texts, {key: vector})."""
        keys = list(dict.fromkeys((e.platform, e.item_id) for e in events))
        cached = self._stored_items(keys, deadline)
        filled, texts = [], {}
        for i, e in enumerate(events):
            key = (e.platform, e.item_id)
            if not e.item_text:
                if key not in cached:
                    raise InvalidInput(f"{field_name}[{i}].item_text is required for an item "
                                       f"not seen before ({e.platform}/{e.item_id})")
                # Event(...) rather than dataclasses.replace: ~5x cheaper, ~50 per profile.
                e = Event(e.event_id, e.user_id, e.platform, e.action, e.item_id,
                          cached[key][0], e.event_time_ms, e.weight, e.digest)
            filled.append(e)
            texts.setdefault(key, e.item_text)
        missing = [k for k, t in texts.items() if k not in cached or cached[k][0] != t]
        vectors = {k: v for k, (_, v) in cached.items()}
        if missing and not cache_new:
            missing = self._session_vectors(missing, texts, vectors, field_name)
        if missing:
            embedded = self.embed([texts[k] for k in missing],
                                  time_left(deadline, "new item texts were embedded"))
            fresh = {k: (texts[k], embedded[j]) for j, k in enumerate(missing)}
            if cache_new:
                self._put_items(fresh, deadline)
            elif self.session_items is not None:
                self.session_items.write(fresh)
            vectors.update({k: v for k, (_, v) in fresh.items()})
        return filled, vectors

    def _session_vectors(self, missing: list[ItemKey], texts: dict[ItemKey, str],
                         vectors: dict[ItemKey, np.ndarray], field_name: str) -> list[ItemKey]:
        """Fill `vectors` from the session cache (same item, same text); the keys still to
        embed. InvalidInput when more than max_new_session_texts are left."""
        if self.session_items is not None:
            held, _ = self.session_items.get(missing)
            hits = {k: vec for k, (text, vec) in held.items() if text == texts[k]}
            vectors.update(hits)
            missing = [k for k in missing if k not in hits]
        if len(missing) > self.max_new_session_texts:
            raise InvalidInput(
                f"{field_name} carry {len(missing)} items whose text this server has no vector "
                f"for; at most {self.max_new_session_texts} may be embedded per call "
                "(--max-new-session-texts): send fewer new items, or Ingest them first")
        return missing

    def ingest(self, raw: Sequence[dict], budget_s: float | None = None
               ) -> tuple[int, int, int]:
        """Validate, embed new item texts and store a batch durably: (accepted, duplicates,
        conflicts), conflicts being the duplicates whose content differs from the stored
        event's (kept; counted in crossrec_fusion_event_conflicts_total).

        All-or-nothing: an invalid event rejects the batch before anything is written.
        BudgetSpent when a store or embedding call outlasts its share of `budget_s`: nothing
        is acknowledged, and re-sending the batch is safe (event ids dedupe).
        """
        deadline = downstream_deadline(budget_s)
        events = self.validate(raw, "events")
        events, _ = self._item_vectors(events, "events", deadline, cache_new=True)
        timeout_s = time_left(deadline, "the events were stored; none were")
        stored = time.perf_counter()
        accepted, duplicates, conflicts = self.store.append(events, timeout_s=timeout_s)
        metrics.FUSION_STORE_SECONDS.labels(self.backend, "append").observe(
            time.perf_counter() - stored)
        metrics.FUSION_EVENTS.labels("accepted").inc(accepted)
        metrics.FUSION_EVENTS.labels("duplicate").inc(duplicates)
        if conflicts:
            metrics.FUSION_EVENT_CONFLICTS.inc(conflicts)
            log.warning("re-sent event ids with other content kept their stored content",
                        extra={"fields": {"conflicts": conflicts}})
        now_ms = time.time() * 1000
        for e in events[:: max(1, len(events) // 20)]:  # a sample keeps this off the hot path
            metrics.FUSION_INGEST_LAG.observe(max(0.0, now_ms - e.event_time_ms) / 1000)
        return accepted, duplicates, conflicts

    def item_stats(self, platform: str, limit: int = 0,
                   budget_s: float | None = None) -> list[tuple[str, int, int]]:
        """(item_id, event count, last event ms), most events first; limit 0 = 100,000."""
        check_platform(platform, "platform")
        limit = limit or 100_000
        if not 1 <= limit <= 1_000_000:
            raise InvalidInput(f"limit must be in 1..1000000, got {limit}")
        return self.store.item_stats(platform, limit, timeout_s=time_left(
            downstream_deadline(budget_s), "item stats were read"))

    def delete_user(self, user_id: str, budget_s: float | None = None) -> int:
        check_id(user_id, "user_id")
        return self.store.delete_user(user_id, timeout_s=time_left(
            downstream_deadline(budget_s), "the user was deleted"))

    # --- profile --------------------------------------------------------------------------
    def profile(self, user_id: str, for_platform: str = "", session: Sequence[dict] = (),
                recent_limit: int = 0, budget_s: float | None = None) -> Profile:
        """Fuse the user's stored events plus `session` events (never stored) into vectors."""
        deadline = downstream_deadline(budget_s)
        if not user_id and not session:
            raise InvalidInput("user_id is required unless session_events are given")
        check_id(user_id, "user_id", required=False)
        if for_platform:
            check_platform(for_platform, "for_platform")
        if not 0 <= recent_limit <= MAX_RECENT_EVENTS:
            raise InvalidInput(f"recent_events_limit must be in 0..{MAX_RECENT_EVENTS}, "
                               f"got {recent_limit}")
        session_events = self.validate(session, "session_events", require_user=False,
                                       limit=MAX_SESSION_EVENTS)
        read = time.perf_counter()
        history = (self.store.history(user_id, timeout_s=time_left(
            deadline, "the profile was read")) if user_id else {})
        metrics.FUSION_STORE_SECONDS.labels(self.backend, "history").observe(
            time.perf_counter() - read)
        stored = [e for h in history.values() for e in h.events]
        events = stored + session_events
        profile = Profile(user_id=user_id, known=bool(events), dim=self.dim,
                          for_platform=for_platform,
                          total_events=sum(h.count for h in history.values()) + len(session_events))
        if not events:
            return profile
        events, vectors = self._item_vectors(events, "session_events", deadline,
                                             cache_new=False)
        events.sort(key=lambda e: (e.event_time_ms, e.event_id))
        window = Window.of(events[-self.model.max_events:], vectors)
        user = (encode_user(self.model, window, for_platform) if self.user_vectors is None
                else self.user_vectors.encode(self.model, window, for_platform))
        profile.fused = user.fused
        shares = {p: float(user.fused_weights[[e.platform == p for e in window.events]].sum())
                  for p in user.platforms}
        for p in user.platforms:
            h = history.get(p)
            session_here = [e for e in session_events if e.platform == p]
            profile.platforms.append(PlatformView(
                platform=p, vector=user.per_platform[p],
                event_count=(h.count if h else 0) + len(session_here),
                last_seen_ms=max([h.last_seen_ms if h else 0] +
                                 [e.event_time_ms for e in session_here]),
                fusion_weight=shares[p]))
        profile.for_platform_vector = user.for_platform
        if recent_limit:
            # Newest first is the window reversed: the order the ranker was trained on.
            explain = user.for_platform_weights if for_platform else user.fused_weights
            newest = range(len(window.events) - 1, -1, -1)
            profile.recent = [(window.events[i], window.vectors[i], float(explain[i]))
                              for i in list(newest)[:recent_limit]]
        return profile

    def close(self) -> None:
        self.store.close()
