"""OpenTelemetry tracing, off unless `--otlp-endpoint` is set: the tracer provider with its
sampler and OTLP exporter, the gRPC server interceptor (W3C traceparent in, a span per RPC),
and the spans services add inside a call (`stage`, `record`).

Off, nothing is installed: no provider, no interceptor, the services' upstream channels carry
no client interceptor, and `stage`/`record` cost one check. On, the upstream channels built by
clients.crossrec_client.open_channel inject the current span, so one Recommend is one trace:
client -> ranking -> fusion -> embedding. Spans are batched in memory (bounded; a full queue
drops spans, never blocks a call) and exported over OTLP/gRPC in a background thread.

Span attributes hold counts, sizes and the instrumentation's RPC fields (method, status code,
peer address), never user ids or texts.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import filters, server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from services.common.security import ConfigError

log = logging.getLogger("crossrec")

# Probes and reflection would be most of the spans and none of the story.
_UNTRACED = filters.negate(filters.any_of(filters.health_check(),
                                          filters.service_prefix("grpc.reflection")))
# Per export call (the SDK default is 10 s). On SIGTERM the queue (at most 2,048 spans, 512
# per export) is flushed: with the collector gone that costs up to 4 timed-out exports, which
# the pods' termination grace still covers after the drain (k8s/base: 30 s = preStop 5 +
# CROSSREC_GRACE_S 15 + 10).
EXPORT_TIMEOUT_S = 2.0
_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


def enabled() -> bool:
    """True once setup() turned tracing on in this process."""
    return _tracer is not None


def setup(service: str, endpoint: str, sample_ratio: float) -> tuple:
    """Turn tracing on for `service` when `endpoint` (OTLP/gRPC, e.g. http://collector:4317;
    http:// is plaintext) is set: the global tracer provider exports there, and the returned
    server interceptors (empty when off) start a span per RPC, continuing the caller's trace.
    `sample_ratio` in [0, 1] samples new traces; a caller's sampled flag is always honoured.
    ConfigError on a bad ratio."""
    global _provider, _tracer
    if not 0.0 <= sample_ratio <= 1.0:
        raise ConfigError(f"--trace-sample-ratio must be in [0, 1], got {sample_ratio}")
    if not endpoint:
        return ()
    _provider = TracerProvider(
        resource=Resource.create({"service.name": f"crossrec-{service}"}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    _provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)))
    trace.set_tracer_provider(_provider)
    _tracer = _provider.get_tracer("crossrec")
    log.info("tracing on", extra={"fields": {"otlp_endpoint": endpoint,
                                             "sample_ratio": sample_ratio}})
    return (server_interceptor(tracer_provider=_provider, filter_=_UNTRACED),)


def shutdown() -> None:
    """Export the spans still queued (bounded: EXPORT_TIMEOUT_S); no-op when off."""
    if _provider is not None:
        _provider.shutdown()


@contextmanager
def stage(histogram, name: str):
    """One stage of a call: its time into `histogram{stage=name}` and, tracing on, a child
    span `name` of the current one (none when the call is not sampled: its children would be
    dropped anyway)."""
    with histogram.labels(name).time():
        if _tracer is None or not trace.get_current_span().is_recording():
            yield
        else:
            with _tracer.start_as_current_span(name):
                yield


def record(name: str, start_ns: int, end_ns: int, **attributes) -> None:
    """A finished child span `name` of the current one, from `start_ns` to `end_ns`
    (time.time_ns()): for work another thread did for this call (the embedding batcher)."""
    if _tracer is not None and trace.get_current_span().is_recording():
        _tracer.start_span(name, start_time=start_ns, attributes=attributes).end(end_ns)
