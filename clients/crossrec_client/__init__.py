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

Modules: `errors` (CrossrecError and its subclasses), `values` (Event, Item, Recommendations...),
`limits` (MAX_MESSAGE_BYTES, MAX_TEXTS_PER_EMBED_CALL: the servers' limits too),
`channels` (open_channel, RetryPolicy: every crossrec channel, the services' own included),
`security` (ClientSecurity: TLS files and token as one value, for services and tools),
`service` (what the three clients share), `embedding` (EmbeddingClient, and embed_in_chunks,
the one Embed chunking loop), `fusion`, `ranking` (one client each), `facade`
(CrossrecClient). Import the names from here.

The library is the bottom of the calling side: backends, the tools (tools/) and the services
themselves (services/common/remote.py) import it; it imports no service, model, export or
tool code (an import contract in pyproject.toml).
"""

from clients.crossrec_client.channels import RetryPolicy, channel_options, open_channel
from clients.crossrec_client.embedding import EmbeddingClient
from clients.crossrec_client.errors import (CrossrecError, DeadlineExceeded, InvalidArgument,
                                            NotFound, ResourceExhausted, Unauthenticated,
                                            Unavailable, error_from_rpc)
from clients.crossrec_client.facade import CrossrecClient
from clients.crossrec_client.fusion import FusionClient
from clients.crossrec_client.ranking import RankingClient
from clients.crossrec_client.security import ClientSecurity
from clients.crossrec_client.values import (Action, Contribution, Driver, Event, IngestResult, Item,
                                            ItemStat, ModelInfo, ModelRef, PlatformProfile,
                                            Profile, ProfileEvent, Recommendation,
                                            Recommendations, Source)

__all__ = [
    "Action", "ClientSecurity", "Contribution", "CrossrecClient", "CrossrecError",
    "DeadlineExceeded", "Driver", "EmbeddingClient", "Event", "FusionClient", "IngestResult",
    "InvalidArgument", "Item", "ItemStat", "ModelInfo", "ModelRef", "NotFound",
    "PlatformProfile", "Profile", "ProfileEvent", "RankingClient", "Recommendation",
    "Recommendations", "ResourceExhausted", "RetryPolicy", "Source", "Unauthenticated",
    "Unavailable", "channel_options", "error_from_rpc", "open_channel",
]
