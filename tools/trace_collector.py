"""A tiny OpenTelemetry collector for tests and benchmarks: an OTLP/gRPC TraceService on
loopback (the opentelemetry-proto contract the services' exporter speaks) that keeps every
span it receives in memory.

    with TraceCollector() as collector:       # services get --otlp-endpoint collector.endpoint
        ...
        spans = collector.trace(trace_id)
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


@dataclass(frozen=True)
class Span:
    """A received span; ids are lowercase hex, `parent_id` "" for a root span."""
    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict
    start_ns: int
    end_ns: int


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink):
        self._sink = sink

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self._sink([Span(
                    service=resource.get("service.name", ""), name=s.name,
                    kind=trace_pb2.Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_id=s.parent_span_id.hex(),
                    attributes={a.key: _value(a.value) for a in s.attributes},
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano)
                    for s in scope_spans.spans])
        return trace_service_pb2.ExportTraceServiceResponse()


class TraceCollector:
    """OTLP/gRPC trace receiver on 127.0.0.1 (a free port); `endpoint` is the services'
    --otlp-endpoint."""

    def __init__(self):
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self._add),
                                                                  self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _add(self, spans: list[Span]) -> None:
        with self._lock:
            self._spans.extend(spans)

    @property
    def spans(self) -> list[Span]:
        """Every span received so far."""
        with self._lock:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, predicate, timeout_s: float = 30.0) -> list[Span]:
        """Every span received, once `predicate(spans)` holds; TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not predicate(spans := self.spans):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(spans)} spans received; the condition did not hold "
                                   f"after {timeout_s:.0f} s")
            time.sleep(0.1)
        return spans

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def start(self) -> TraceCollector:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0).wait()

    def __enter__(self) -> TraceCollector:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
