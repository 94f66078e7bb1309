"""The ranking service's client: catalogue upserts and deletes, recommendations."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from clients.crossrec_client.service import ServiceClient
from clients.crossrec_client.values import (Contribution, Driver, Event, Item, ModelRef,
                                            Recommendation, Recommendations, Source)
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc


class RankingClient(ServiceClient):
    """crossrec.ranking.v1.RankingService: the catalogue and recommendations."""
    SERVICE = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name
    _STUB = ranking_pb2_grpc.RankingServiceStub

    def upsert_items(self, items: Iterable[Item | Mapping[str, Any]], *,
                     timeout: float | None = None) -> int:
        """Add or replace 1..1,000 items, all or nothing; embedded and retrievable when this
        returns. The number stored."""
        request = ranking_pb2.UpsertItemsRequest(items=[Item.of(i).to_pb() for i in items])
        return self._invoke(self.stub.UpsertItems, request, timeout).upserted

    def delete_items(self, platform: str, item_ids: Iterable[str], *,
                     timeout: float | None = None) -> int:
        """Remove items (1..1,000 ids); unknown ids are ignored. The number removed."""
        request = ranking_pb2.DeleteItemsRequest(platform=platform, item_ids=list(item_ids))
        return self._invoke(self.stub.DeleteItems, request, timeout).deleted

    def recommend(self, user_id: str, platform: str, k: int = 10, *, exclude_seen: bool = False,
                  session_events: Iterable[Event | Mapping[str, Any]] = (),
                  diversify: bool = False, diversity_lambda: float = 0.0,
                  timeout: float | None = None) -> Recommendations:
        """Top-k items of `platform` for the user (k in 1..the server's max_k).
        `session_events` are fused for this call only (user_id may then be empty)."""
        r = self._invoke(self.stub.Recommend, ranking_pb2.RecommendRequest(
            user_id=user_id, platform=platform, k=k, exclude_seen=exclude_seen,
            session_events=[Event.of(e).to_pb() for e in session_events], diversify=diversify,
            diversity_lambda=diversity_lambda), timeout)
        return Recommendations(
            items=[Recommendation(
                i.item_id, i.platform, i.title, i.score, Source.from_pb(i.source), i.explanation,
                [Contribution(c.platform, c.item_id, c.item_text, c.similarity, c.co_users)
                 for c in i.contributions], Driver.from_pb(i.driver),
                {Driver.from_pb(a.driver): a.contribution for a in i.attributions})
                for i in r.items],
            source=Source.from_pb(r.source), platform_weights=dict(r.platform_weights),
            degraded=r.degraded, degraded_reason=r.degraded_reason,
            models=[ModelRef.from_pb(m) for m in r.models])
