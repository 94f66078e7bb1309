"""Service-to-service calls as plain Python: `EmbeddingRemote` (texts -> vectors) and
`FusionRemote` (user profiles, item popularity).

gRPC errors become engine errors here, so engines never see grpc: UNAVAILABLE -> NotReady,
DEADLINE_EXCEEDED -> BudgetSpent, RESOURCE_EXHAUSTED -> Overloaded.

Channels come from the client library's one builder (open_channel in
clients/crossrec_client/channels.py): the same message limits, keepalive, bounded reconnect
backoff (at most ~1 s, so a restarted dependency is found about a second after its port
opens, not after gRPC's default backoff of up to 120 s) and token handling as a backend's
channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import numpy as np

from clients.crossrec_client.channels import RetryPolicy, open_channel
from clients.crossrec_client.embedding import embed_in_chunks
from clients.crossrec_client.limits import MAX_TEXTS_PER_EMBED_CALL
from clients.crossrec_client.security import ClientSecurity
from crossrec.common.v1 import common_pb2
from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from services.common import tracing
from services.common.errors import BudgetSpent, InvalidInput, NotReady, Overloaded

DEFAULT_TIMEOUT_S = 30.0
_ERRORS = {grpc.StatusCode.DEADLINE_EXCEEDED: BudgetSpent,
           grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
           grpc.StatusCode.INVALID_ARGUMENT: InvalidInput}
# The client library's policy (same codes, same kind of backoff), one retry only: the caller
# of this service retries too, and five attempts at each hop would multiply (25 against a
# dependency that is down) and cost ~3 s, so that a dependency that is down would be
# reported as DEADLINE_EXCEEDED instead of UNAVAILABLE naming it. One quick retry still
# rides out a reset connection or a call that raced the dependency's shutdown.
UPSTREAM_RETRY = RetryPolicy(max_attempts=2, initial_backoff_s=0.1, max_backoff_s=0.1)


def upstream_channel(address: str, service: str, security: ClientSecurity,
                     retry: RetryPolicy | None = UPSTREAM_RETRY
                     ) -> tuple[grpc.Channel, grpc.Channel]:
    """(channel for stubs, channel to close) to `service` at `address`, built by the client
    library's open_channel; the token goes in as metadata on every call, and the current
    trace context when this process traces (services/common/tracing.py)."""
    return open_channel(address, [service], retry=retry, tls_ca=security.tls_ca or None,
                        tls_cert=security.tls_cert or None, tls_key=security.tls_key or None,
                        token=security.token or None, trace=tracing.enabled())


def rpc_error(err: grpc.RpcError, what: str) -> Exception:
    """The engine error for a failed downstream call."""
    cls = _ERRORS.get(err.code(), NotReady)
    return cls(f"{what}: {err.code().name}: {err.details()}")


class EmbeddingRemote:
    """Calls EmbeddingService.Embed in chunks (the client library's embed_in_chunks);
    returns float32 [n, dim]."""

    def __init__(self, address: str, security: ClientSecurity = ClientSecurity(),
                 max_texts_per_call: int = MAX_TEXTS_PER_EMBED_CALL):
        self.address = address
        self.max_texts_per_call = max_texts_per_call
        channel, self._channel = upstream_channel(
            address, embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
            security)
        self._stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)

    def model(self) -> tuple[str, int, int]:
        """(name, version, dim) of the remote model."""
        try:
            info = self._stub.ModelInfo(embedding_pb2.ModelInfoRequest(), timeout=10)
        except grpc.RpcError as err:
            raise rpc_error(err, f"embedding service at {self.address}") from None
        return info.model.name, info.model.version, info.dim

    def __call__(self, texts: list[str], budget_s: float | None = None) -> np.ndarray:
        try:
            return embed_in_chunks(self._stub.Embed, texts, self.max_texts_per_call,
                                   budget_s or DEFAULT_TIMEOUT_S)
        except grpc.RpcError as err:
            raise rpc_error(err, f"embedding service at {self.address}") from None

    def close(self) -> None:
        self._channel.close()


@dataclass
class RemoteProfile:
    """A user's profile as the ranking engine needs it; vectors float32 [dim]."""
    known: bool
    for_platform: np.ndarray | None = None
    fused: np.ndarray | None = None
    per_platform: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    # recent events newest first: (platform, item_id, item_text), and their vectors [n, dim]
    recent: list[tuple[str, str, str]] = field(default_factory=list)
    recent_vectors: np.ndarray | None = None
    model: tuple[str, int] = ("", 0)


def _vec(values) -> np.ndarray | None:
    return np.asarray(values, dtype=np.float32) if len(values) else None


def _pb_event(e: dict) -> common_pb2.BehaviorEvent:
    return common_pb2.BehaviorEvent(**{k: v for k, v in e.items() if v is not None})


class FusionRemote:
    """Calls FusionService.GetProfile / GetItemStats; engine errors on failure."""

    def __init__(self, address: str, security: ClientSecurity = ClientSecurity()):
        self.address = address
        channel, self._channel = upstream_channel(
            address, fusion_pb2.DESCRIPTOR.services_by_name["FusionService"].full_name, security)
        self._stub = fusion_pb2_grpc.FusionServiceStub(channel)

    def profile(self, user_id: str, for_platform: str, session_events: list[dict],
                recent_limit: int, budget_s: float | None,
                item_vectors: bool = True) -> RemoteProfile:
        """The profile; `item_vectors` False: recent_vectors is None (the caller looks the
        recent items' vectors up itself, GetProfileRequest.omit_item_vectors)."""
        request = fusion_pb2.GetProfileRequest(
            user_id=user_id, for_platform=for_platform, recent_events_limit=recent_limit,
            session_events=[_pb_event(e) for e in session_events],
            omit_item_vectors=not item_vectors)
        try:
            reply = self._stub.GetProfile(request, timeout=budget_s or DEFAULT_TIMEOUT_S)
        except grpc.RpcError as err:
            raise rpc_error(err, f"fusion service at {self.address}") from None
        recent = [(r.event.platform, r.event.item_id, r.event.item_text)
                  for r in reply.recent_events]
        return RemoteProfile(
            known=reply.known, for_platform=_vec(reply.for_platform_vector),
            fused=_vec(reply.fused_vector),
            per_platform={p.platform: _vec(p.vector) for p in reply.platforms},
            counts={p.platform: p.event_count for p in reply.platforms},
            weights={p.platform: p.fusion_weight for p in reply.platforms},
            recent=recent,
            recent_vectors=(np.asarray([r.item_vector for r in reply.recent_events], np.float32)
                            if recent and item_vectors else None),
            model=(reply.model.name, reply.model.version))

    def item_stats(self, platform: str, limit: int = 0) -> list[tuple[str, int, int]]:
        try:
            reply = self._stub.GetItemStats(
                fusion_pb2.GetItemStatsRequest(platform=platform, limit=limit), timeout=30)
        except grpc.RpcError as err:
            raise rpc_error(err, f"fusion service at {self.address}") from None
        return [(s.item_id, s.event_count, s.last_event_ms) for s in reply.items]

    def close(self) -> None:
        self._channel.close()
