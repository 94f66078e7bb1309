"""The crossrec Python client: typed calls to the embedding, fusion and ranking services.

    from clients.crossrec_client import CrossrecClient, Event
    with CrossrecClient(fusion="127.0.0.1:50052", ranking="127.0.0.1:50053") as crossrec:
        crossrec.fusion.ingest([Event("u1", "office", "4711", "purchase", item_text="stapler")])
        for item in crossrec.ranking.recommend("u1", "office", k=5):
            print(f"{item.score:.3f} {item.title} ({item.source}: {item.explanation})")

Callers see plain Python: dataclasses, lists, dicts and float32 numpy arrays; no protobuf.
Every call has a deadline (`timeout_s` in the constructor, `timeout=` per call) and fails
with a `CrossrecError` subclass whose str() is one line, `"<CODE>: <details>"`.

Retries are gRPC's own, from the service config passed as a channel option: a call that gets
UNAVAILABLE (server restarting, connection refused, service still loading) or CANCELLED by the
server is re-sent with exponential backoff, within its deadline. A crossrec server never
answers CANCELLED from a handler that ran: it comes from gRPC core cancelling a call that
raced the server's shutdown (sent before the client saw the GOAWAY, never handed to a
handler), or from an idle stream cancelled by the server; both are safe to re-send. Nothing
else is retried. Ingest is safe to retry because events are deduplicated by `event_id`; for an
event without one the server derives an id from its fields and time, so the client stamps an
unset `event_time_ms` with its own clock before sending, and a re-sent batch derives the same
ids. A client-streamed call is retried only while its messages fit the retry buffer.

For what the typed methods do not cover, each client exposes the generated stub
(`client.ranking.stub`, no default deadline or error mapping) and `call(rpc, request)`, which
sends a raw request message with the deadline, token and error mapping and returns the raw
response message.

TLS: pass `tls_ca` (PEM path; the channel is then secure), plus `tls_cert` and `tls_key` for
mutual TLS; `token` adds `authorization: Bearer <token>` metadata to every call, stubs included.

Tracing: every call, stubs included, carries the caller's current OpenTelemetry context as a
W3C `traceparent` (opentelemetry-instrumentation-grpc's client interceptor), so the services'
spans join the caller's trace; with a tracer provider configured, each call is also a client
span. Without one nothing is recorded.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel as traced_channel

from crossrec.common.v1 import common_pb2
from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc

__all__ = [
    "Action", "Contribution", "CrossrecClient", "CrossrecError", "DeadlineExceeded",
    "EmbeddingClient", "Event", "FusionClient", "IngestResult", "InvalidArgument", "Item",
    "ItemStat", "ModelInfo", "ModelRef", "NotFound", "PlatformProfile", "Profile",
    "ProfileEvent", "RankingClient", "Recommendation", "Recommendations", "ResourceExhausted",
    "RetryPolicy", "Source", "Unauthenticated", "Unavailable", "error_from_rpc",
]

DEFAULT_TIMEOUT_S = 10.0
# The servers accept and send at most 16 MiB per message (services/common/serve.py).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Longest wait between reconnection attempts to a service that went away (see channel_options).
MAX_RECONNECT_BACKOFF_MS = 1_000
# A call is retried only while everything it sent fits this buffer; 4 MiB holds a full
# 1,000-event Ingest batch with long item texts (gRPC's default, 256 KiB, does not).
RETRY_BUFFER_BYTES = 4 * 1024 * 1024


# --- errors ---------------------------------------------------------------------------------

class CrossrecError(Exception):
    """A failed call: `code` is the gRPC status name, `details` the server's message."""

    def __init__(self, code: str, details: str):
        super().__init__(code, details)
        self.code = code
        self.details = " ".join((details or "").split())

    def __str__(self) -> str:
        return f"{self.code}: {self.details}"


class InvalidArgument(CrossrecError):
    """The request is malformed; the details name the field, the value and the limit."""


class NotFound(CrossrecError):
    """The named object does not exist."""


class Unavailable(CrossrecError):
    """The service cannot be reached, is starting or draining (retries were exhausted)."""


class DeadlineExceeded(CrossrecError):
    """The call's deadline passed; the server dropped the work."""


class ResourceExhausted(CrossrecError):
    """A server queue or concurrency limit is full; back off and retry later."""


class Unauthenticated(CrossrecError):
    """The server refused the credentials (token or client certificate)."""


_ERROR_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_from_rpc(err: grpc.RpcError) -> CrossrecError:
    """The CrossrecError (subclass) for a failed gRPC call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return _ERROR_BY_CODE.get(code, CrossrecError)(code.name, details or "")


# --- values ---------------------------------------------------------------------------------

class Action(enum.StrEnum):
    """What a user did to an item (crossrec.common.v1.Action)."""
    VIEW = "view"
    CLICK = "click"
    LIKE = "like"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    RATE = "rate"  # Event.weight carries the 1..5 rating
    INTERACT = "interact"

    @property
    def number(self) -> int:
        return common_pb2.Action.Value("ACTION_" + self.name)


_ACTION_BY_NUMBER = {a.number: a for a in Action}


def _action(value: Action | str | int) -> Action:
    if isinstance(value, Action):
        return value
    if isinstance(value, int) and value in _ACTION_BY_NUMBER:
        return _ACTION_BY_NUMBER[value]
    if isinstance(value, str) and value.lower() in Action._value2member_map_:
        return Action(value.lower())
    raise InvalidArgument("INVALID_ARGUMENT", f"action must be one of "
                          f"{', '.join(a.value for a in Action)}, got {value!r}")


class Source(enum.StrEnum):
    """Why an item was recommended (crossrec.ranking.v1.Source)."""
    UNSPECIFIED = "unspecified"
    PERSONALISED = "personalised"
    CROSS_PLATFORM = "cross_platform"
    POPULARITY_FALLBACK = "popularity_fallback"


def _source(number: int) -> Source:
    try:
        return Source(ranking_pb2.Source.Name(number).removeprefix("SOURCE_").lower())
    except ValueError:  # a value added to the contract after this client was built
        return Source.UNSPECIFIED


@dataclass(frozen=True)
class Event:
    """One behaviour event. `action` takes an Action, its name ("purchase") or its number.

    `event_id` empty: the server derives one; `event_time_ms` 0: now (stamped by the client
    on ingest, so a retried batch derives the same ids); `weight` None: the action's default.
    """
    user_id: str
    platform: str
    item_id: str
    action: Action | str | int
    item_text: str = ""
    event_time_ms: int = 0
    weight: float | None = None
    event_id: str = ""

    def __post_init__(self):
        object.__setattr__(self, "action", _action(self.action))

    @classmethod
    def of(cls, value: Event | Mapping[str, Any]) -> Event:
        """An Event from itself or from a mapping of its fields (e.g. datasets.to_event)."""
        return value if isinstance(value, Event) else cls(**value)

    def to_pb(self, now_ms: int = 0) -> common_pb2.BehaviorEvent:
        pb = common_pb2.BehaviorEvent(
            event_id=self.event_id, user_id=self.user_id, platform=self.platform,
            action=self.action.number, item_id=self.item_id, item_text=self.item_text,
            event_time_ms=self.event_time_ms or now_ms)
        if self.weight is not None:
            pb.weight = self.weight
        return pb

    @classmethod
    def from_pb(cls, pb: common_pb2.BehaviorEvent) -> Event:
        return cls(user_id=pb.user_id, platform=pb.platform, item_id=pb.item_id,
                   action=_ACTION_BY_NUMBER.get(pb.action, Action.INTERACT),
                   item_text=pb.item_text, event_time_ms=pb.event_time_ms,
                   weight=pb.weight if pb.HasField("weight") else None, event_id=pb.event_id)


@dataclass(frozen=True)
class Item:
    """A catalogue item; `attributes` values are appended to the title for embedding."""
    item_id: str
    platform: str
    title: str
    attributes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, value: Item | Mapping[str, Any]) -> Item:
        return value if isinstance(value, Item) else cls(**value)

    def to_pb(self) -> ranking_pb2.Item:
        return ranking_pb2.Item(item_id=self.item_id, platform=self.platform, title=self.title,
                                attributes=dict(self.attributes))


@dataclass(frozen=True)
class ModelRef:
    """A model in the model repository: models/<name>/<version>/."""
    name: str
    version: int

    @classmethod
    def from_pb(cls, pb: common_pb2.ModelRef) -> ModelRef:
        return cls(pb.name, pb.version)


@dataclass(frozen=True)
class ModelInfo:
    """The embedding service's model and limits."""
    model: ModelRef
    dim: int
    max_sequence_tokens: int
    max_texts_per_request: int
    provider: str
    source_model: str
    precision: str


@dataclass(frozen=True)
class IngestResult:
    """Counts over acknowledged (durable) events.

    accepted: newly stored; duplicates: already stored (by event_id); batches: request
    messages processed; events: input events covered (counted by the client); conflicts: the
    duplicates whose content (platform, action, item, time as sent, weight) differs from the
    stored event's, which was kept: a re-used event id, worth a look.
    """
    accepted: int = 0
    duplicates: int = 0
    batches: int = 0
    events: int = 0
    conflicts: int = 0

    def __add__(self, other: IngestResult) -> IngestResult:
        return IngestResult(self.accepted + other.accepted, self.duplicates + other.duplicates,
                            self.batches + other.batches, self.events + other.events,
                            self.conflicts + other.conflicts)


@dataclass(frozen=True)
class PlatformProfile:
    """The user on one platform; `vector` float32 [dim], L2-normalised."""
    platform: str
    vector: np.ndarray
    event_count: int
    last_seen_ms: int
    fusion_weight: float


@dataclass(frozen=True)
class ProfileEvent:
    """A stored event and its item vector (float32 [dim], L2-normalised)."""
    event: Event
    item_vector: np.ndarray


@dataclass(frozen=True)
class Profile:
    """A user's fused profile. Vectors are float32 [dim], None when the user is unknown."""
    user_id: str
    known: bool
    platforms: dict[str, PlatformProfile]
    fused_vector: np.ndarray | None
    for_platform: str
    for_platform_vector: np.ndarray | None
    dim: int
    total_events: int
    model: ModelRef
    baseline: bool
    recent_events: list[ProfileEvent]


@dataclass(frozen=True)
class ItemStat:
    """Events stored on one item (all users, all time) and the newest one's time."""
    item_id: str
    event_count: int
    last_event_ms: int


@dataclass(frozen=True)
class Contribution:
    """A history item that drove a recommendation; `similarity` is a cosine in [-1, 1]."""
    platform: str
    item_id: str
    item_text: str
    similarity: float


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    platform: str
    title: str
    score: float
    source: Source
    explanation: str
    contributions: list[Contribution]


@dataclass(frozen=True)
class Recommendations:
    """A ranked list, best first; iterate it for the items."""
    items: list[Recommendation]
    source: Source
    platform_weights: dict[str, float]
    degraded: bool
    degraded_reason: str
    models: list[ModelRef]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def _vector(values) -> np.ndarray | None:
    return np.asarray(values, dtype=np.float32) if len(values) else None


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- channels -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retryPolicy for every method; backoffs get +-20% jitter from gRPC core.

    The defaults ride out a connection reset or a brief restart (about 3 s of retrying in
    all), well inside the default 10 s deadline, so a service that stays down still reports
    UNAVAILABLE rather than DEADLINE_EXCEEDED. gRPC caps max_attempts at 5. CANCELLED is
    retried too: see the module docstring (a call that raced a server's shutdown).
    """
    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE", "CANCELLED")

    def service_config(self, services: Sequence[str]) -> str:
        return json.dumps({"methodConfig": [{
            "name": [{"service": s} for s in services],
            "retryPolicy": {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s:.3f}s",
                "maxBackoff": f"{self.max_backoff_s:.3f}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": list(self.retryable_codes),
            }}]})


_HEALTH_SERVICE = "grpc.health.v1.Health"


def channel_options(services: Sequence[str], retry: RetryPolicy | None) -> list[tuple[str, Any]]:
    """Options every crossrec channel gets: message limits, keepalive, reconnect, retries."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Notice a dead peer (e.g. a node gone without FIN) within ~40 s on long calls.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Reconnect sooner than gRPC's 1 s x 1.6 up to 120 s: calls to a channel in backoff
        # fail at once, so the backoff is how long a restarted service stays unreachable. At
        # most 1 s (+-20 % jitter, so clients do not arrive together) finds it within ~1.2 s
        # of its port opening, for one TCP connect a second per channel while it is down.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.primary_user_agent", "crossrec-python-client/1"),
    ]
    if retry is None:
        options.append(("grpc.enable_retries", 0))
    else:
        options += [("grpc.enable_retries", 1),
                    ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
                    ("grpc.service_config", retry.service_config(services))]
    return options


class _Details(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call, also over plaintext channels
    (gRPC's call credentials need TLS; a loopback or mesh-encrypted hop may not have it)."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        return _Details(details, [*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def open_channel(address: str, services: Sequence[str], *, retry: RetryPolicy | None,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, tls_server_name: str | None = None,
                 token: str | None = None, options: Sequence[tuple[str, Any]] = (),
                 trace: bool = True) -> tuple[grpc.Channel, grpc.Channel]:
    """(channel for stubs, underlying channel to close). Secure when a CA or a client
    certificate is given (no CA: the system roots verify the server). `trace`: every call
    carries the caller's OpenTelemetry context (W3C traceparent) and is a client span of the
    global tracer provider (none configured: no span, the context still travels)."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("mutual TLS needs both tls_cert and tls_key")
    opts = channel_options(services, retry) + list(options)
    if tls_server_name:
        opts.append(("grpc.ssl_target_name_override", tls_server_name))
    if tls_ca or tls_cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(tls_ca), private_key=_read(tls_key),
            certificate_chain=_read(tls_cert))
        base = grpc.secure_channel(address, credentials, options=opts)
    else:
        base = grpc.insecure_channel(address, options=opts)
    channel = grpc.intercept_channel(base, _BearerToken(token)) if token else base
    if trace:
        channel = traced_channel(channel, client_interceptor())
    return channel, base


# --- service clients ------------------------------------------------------------------------

class _ServiceClient:
    SERVICE = ""
    _STUB: type = object

    def __init__(self, address: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = RetryPolicy(), tls_ca: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 tls_server_name: str | None = None, token: str | None = None,
                 options: Sequence[tuple[str, Any]] = ()):
        self.address = address
        self.timeout_s = timeout_s
        self.channel, self._base = open_channel(
            address, [self.SERVICE, _HEALTH_SERVICE], retry=retry, tls_ca=tls_ca,
            tls_cert=tls_cert, tls_key=tls_key, tls_server_name=tls_server_name, token=token,
            options=options)
        self.stub = self._STUB(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _invoke(self, method: Callable, request, timeout: float | None):
        try:
            return method(request, timeout=self.timeout_s if timeout is None else timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    def call(self, rpc: str, request, *, timeout: float | None = None):
        """Send a raw request message to `rpc` (e.g. "Recommend"); the raw response message."""
        return self._invoke(getattr(self.stub, rpc), request, timeout)

    def health(self, *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of this service: "SERVING", "NOT_SERVING", ...;
        NotFound when the server at this address does not host the service."""
        reply = self._invoke(self._health.Check,
                             health_pb2.HealthCheckRequest(service=self.SERVICE), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self._base.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"


class EmbeddingClient(_ServiceClient):
    """crossrec.embedding.v1.EmbeddingService: texts to L2-normalised float32 vectors."""
    SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
    _STUB = embedding_pb2_grpc.EmbeddingServiceStub

    def __init__(self, address: str, *, max_texts_per_call: int = 256, **options):
        super().__init__(address, **options)
        self.max_texts_per_call = max_texts_per_call

    def embed(self, texts: Sequence[str] | str, *, timeout: float | None = None) -> np.ndarray:
        """float32 [len(texts), dim], one unit-length row per text, in order. Lists longer
        than `max_texts_per_call` are sent as concurrent calls (the server batches them)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        step = self.max_texts_per_call
        requests = [embedding_pb2.EmbedRequest(texts=texts[i:i + step])
                    for i in range(0, max(len(texts), 1), step)]
        timeout = self.timeout_s if timeout is None else timeout
        futures = [self.stub.Embed.future(r, timeout=timeout) for r in requests]
        rows = []
        try:
            for future in futures:
                rows.extend(e.values for e in future.result().embeddings)
        except grpc.RpcError as err:
            for future in futures:
                future.cancel()
            raise error_from_rpc(err) from err
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), -1)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        r = self._invoke(self.stub.ModelInfo, embedding_pb2.ModelInfoRequest(), timeout)
        return ModelInfo(ModelRef.from_pb(r.model), r.dim, r.max_sequence_tokens,
                         r.max_texts_per_request, r.provider, r.source_model, r.precision)


ProgressCallback = Callable[[IngestResult], None]


class FusionClient(_ServiceClient):
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


class RankingClient(_ServiceClient):
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
                i.item_id, i.platform, i.title, i.score, _source(i.source), i.explanation,
                [Contribution(c.platform, c.item_id, c.item_text, c.similarity)
                 for c in i.contributions]) for i in r.items],
            source=_source(r.source), platform_weights=dict(r.platform_weights),
            degraded=r.degraded, degraded_reason=r.degraded_reason,
            models=[ModelRef.from_pb(m) for m in r.models])


class CrossrecClient:
    """The three service clients with one set of options; any address may be omitted.

    Options (keyword-only, shared): timeout_s, retry (RetryPolicy or None), tls_ca,
    tls_cert, tls_key, tls_server_name, token, options (extra channel options).
    """

    def __init__(self, embedding: str | None = None, fusion: str | None = None,
                 ranking: str | None = None, **options):
        self._clients: dict[str, _ServiceClient] = {}
        try:
            for name, cls, address in (("embedding", EmbeddingClient, embedding),
                                       ("fusion", FusionClient, fusion),
                                       ("ranking", RankingClient, ranking)):
                if address:
                    self._clients[name] = cls(address, **options)
        except BaseException:
            self.close()
            raise

    def _get(self, name: str):
        try:
            return self._clients[name]
        except KeyError:
            raise ValueError(f"this CrossrecClient has no {name} address; "
                             f"pass {name}='host:port'") from None

    @property
    def embedding(self) -> EmbeddingClient:
        return self._get("embedding")

    @property
    def fusion(self) -> FusionClient:
        return self._get("fusion")

    @property
    def ranking(self) -> RankingClient:
        return self._get("ranking")

    @property
    def configured(self) -> dict[str, _ServiceClient]:
        """{service name: client} for the addresses given."""
        return dict(self._clients)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
