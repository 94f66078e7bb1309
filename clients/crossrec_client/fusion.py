"""The fusion service's client: event ingest (single calls and resumable streams), profiles,
user deletion, item stats."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

import numpy as np

from clients.crossrec_client.service import ServiceClient
from clients.crossrec_client.values import (Event, IngestResult, ItemStat, ModelRef,
                                            PlatformProfile, Profile, ProfileEvent)
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc


def _vector(values) -> np.ndarray | None:
    return np.asarray(values, dtype=np.float32) if len(values) else None


def _now_ms() -> int:
    return int(time.time() * 1000)


ProgressCallback = Callable[[IngestResult], None]


class FusionClient(ServiceClient):
    """crossrec.fusion.v1.FusionService: durable behaviour events and fused user profiles."""
    SERVICE = fusion_pb2.DESCRIPTOR.services_by_name["FusionService"].full_name
    _STUB = fusion_pb2_grpc.FusionServiceStub

    def ingest(self, events: Iterable[Event | Mapping[str, Any]], *,
               timeout: float | None = None) -> IngestResult:
        """Store 1..1,000 events, all or nothing; durable when this returns. Safe to retry
        (and retried on UNAVAILABLE): known event ids come back as duplicates."""
        now = _now_ms()
        pbs = [Event.of(e).to_pb(now) for e in events]
        reply = self._invoke(self.stub.Ingest, fusion_pb2.IngestRequest(events=pbs), timeout)
        return IngestResult(reply.accepted, reply.duplicates, 1, len(pbs), reply.conflicts)

    def ingest_stream(self, events: Iterable[Event | Mapping[str, Any]], *,
                      batch_size: int = 1000, checkpoint_batches: int = 10,
                      progress: ProgressCallback | None = None,
                      timeout: float | None = None) -> IngestResult:
        """Bulk load over IngestStream: `batch_size` (1..1,000) events per message.

        IngestStream answers once, when the stream ends, so every `checkpoint_batches`
        messages the stream is closed and a new one opened: `progress(total_so_far)` is then
        called with everything durable so far. On an error the CrossrecError is raised and
        what `progress` last reported is durable; re-send the rest (ids dedupe). `timeout`
        applies to each stream. Events are read lazily, one checkpoint at a time.
        """
        if batch_size < 1 or checkpoint_batches < 1:
            raise ValueError("batch_size and checkpoint_batches must be >= 1")
        source, total = iter(events), IngestResult()
        while True:
            now, batches, count = _now_ms(), [], 0
            while len(batches) < checkpoint_batches:
                chunk = [Event.of(e).to_pb(now) for e in islice(source, batch_size)]
                if not chunk:
                    break
                batches.append(fusion_pb2.IngestRequest(events=chunk))
                count += len(chunk)
            if not batches:
                return total
            reply = self._invoke(self.stub.IngestStream, iter(batches), timeout)
            total += IngestResult(reply.accepted, reply.duplicates, reply.batches, count,
                                  reply.conflicts)
            if progress is not None:
                progress(total)

    def profile(self, user_id: str, for_platform: str | None = None, recent: int = 0, *,
                session_events: Iterable[Event | Mapping[str, Any]] = (),
                timeout: float | None = None) -> Profile:
        """The user's fused profile; an unknown user is `known=False`, not an error.
        `recent`: also return up to this many newest events (0..200) with item vectors."""
        r = self._invoke(self.stub.GetProfile, fusion_pb2.GetProfileRequest(
            user_id=user_id, for_platform=for_platform or "", recent_events_limit=recent,
            session_events=[Event.of(e).to_pb() for e in session_events]), timeout)
        return Profile(
            user_id=r.user_id, known=r.known,
            platforms={p.platform: PlatformProfile(p.platform, _vector(p.vector), p.event_count,
                                                   p.last_seen_ms, p.fusion_weight)
                       for p in r.platforms},
            fused_vector=_vector(r.fused_vector), for_platform=r.for_platform,
            for_platform_vector=_vector(r.for_platform_vector), dim=r.dim,
            total_events=r.total_events, model=ModelRef.from_pb(r.model), baseline=r.baseline,
            recent_events=[ProfileEvent(Event.from_pb(e.event), _vector(e.item_vector))
                           for e in r.recent_events])

    def delete_user(self, user_id: str, *, timeout: float | None = None) -> int:
        """Remove every trace of the user; the number of events deleted (0 if unknown)."""
        reply = self._invoke(self.stub.DeleteUser, fusion_pb2.DeleteUserRequest(user_id=user_id),
                             timeout)
        return reply.deleted_events

    def item_stats(self, platform: str, limit: int = 0, *,
                   timeout: float | None = None) -> list[ItemStat]:
        """Items of `platform` with events, most events first; limit 0: 100,000."""
        reply = self._invoke(self.stub.GetItemStats, fusion_pb2.GetItemStatsRequest(
            platform=platform, limit=limit), timeout)
        return [ItemStat(s.item_id, s.event_count, s.last_event_ms) for s in reply.items]
