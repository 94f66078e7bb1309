"""Prometheus metrics shared by every server: RPC counts by method and status code, RPC
latency histograms (seconds), model info; each service adds its own from this registry.
Served on a separate port (`--metrics-port`; 0 turns the endpoint off), plaintext and without
a token, bound to `--metrics-host` (default: the server's `--host`). A server run as worker
processes (services/common/workers.py) uses prometheus-client's multiprocess mode: each
worker writes its samples to files, the parent's endpoint sums them (gauges as their
`multiprocess_mode` says; an Info, per process, is not in that scrape)."""

from __future__ import annotations

import os
import time

import grpc
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, multiprocess,
                               start_http_server, values)

# Latency buckets from 0.5 ms to 10 s: embedding batches and Recommend live in 1-100 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)

RPC_REQUESTS = Counter("crossrec_grpc_requests", "gRPC requests handled",
                       ["service", "method", "code"])
RPC_SECONDS = Histogram("crossrec_grpc_request_duration_seconds", "gRPC request latency",
                        ["service", "method"], buckets=LATENCY_BUCKETS)
MODEL_INFO = Info("crossrec_model", "Models a server has loaded", ["service", "model"])
MODEL_VERSION = Gauge("crossrec_model_version", "Version of each model a server has loaded",
                      ["service", "model"], multiprocess_mode="livemax")
# Worker processes: ready only when every live worker is.
READY = Gauge("crossrec_ready", "1 when health is SERVING", ["service"],
              multiprocess_mode="livemin")
ADMISSION_WAITING = Gauge("crossrec_admission_waiting", "Calls waiting for an engine slot "
                          "(summed over worker processes)", ["gate"],
                          multiprocess_mode="livesum")
ADMISSION_REFUSED = Counter("crossrec_admission_refused", "Calls refused by admission control",
                            ["gate", "reason"])

# embedding
EMBED_QUEUE_TEXTS = Gauge("crossrec_embedding_queue_texts", "Texts waiting in the batcher")
EMBED_BATCH_SIZE = Histogram("crossrec_embedding_batch_size_texts", "Texts per model call",
                             buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
EMBED_BATCH_SECONDS = Histogram("crossrec_embedding_batch_duration_seconds",
                                "Model call latency per batch", buckets=LATENCY_BUCKETS)
EMBED_DROPPED = Counter("crossrec_embedding_dropped", "Requests dropped in the batcher",
                        ["reason"])

# fusion
FUSION_EVENTS = Counter("crossrec_fusion_events", "Events acknowledged", ["result"])
FUSION_STORE_SECONDS = Histogram("crossrec_fusion_store_duration_seconds",
                                 "Profile store latency", ["backend", "op"],
                                 buckets=LATENCY_BUCKETS)
FUSION_EVENT_CONFLICTS = Counter(
    "crossrec_fusion_event_conflicts", "Re-sent event ids whose content differs from the "
    "stored event (acknowledged as duplicates; the stored event is kept)")
FUSION_INGEST_LAG = Histogram("crossrec_fusion_ingest_lag_seconds",
                              "Acknowledgement time minus event time",
                              buckets=(0.01, 0.1, 1, 10, 60, 600, 3600, 86400, 864000))
FUSION_USER_VECTOR_CACHE = Counter(
    "crossrec_fusion_user_vector_cache", "Profiles whose user vectors came from the cache "
    "(hit) or a model call (miss)", ["result"])

# ranking
RANKING_STAGE_SECONDS = Histogram("crossrec_ranking_stage_duration_seconds",
                                  "Recommend latency by stage", ["stage"],
                                  buckets=LATENCY_BUCKETS)
RANKING_SOURCE = Counter("crossrec_ranking_recommendations", "Recommend answers by source",
                         ["source"])
CATALOG_ITEMS = Gauge("crossrec_ranking_catalog_items", "Catalogue size", ["platform"],
                      multiprocess_mode="livemax")


def serve_metrics(port: int, host: str) -> None:
    """Start the /metrics endpoint on `host` in a daemon thread (port 0: do nothing)."""
    if port:
        start_http_server(port, addr=host)


def use_multiprocess(directory: str) -> None:
    """Make every metric value created from now on (this process and the ones it forks)
    live in files under `directory`; call before the first fork."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()


def serve_multiprocess_metrics(port: int, host: str, directory: str) -> None:
    """The /metrics endpoint summing every process's files under `directory`."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    start_http_server(port, addr=host, registry=registry)


def mark_process_dead(pid: int, directory: str) -> None:
    """Drop a dead worker's live gauges from the sums (its counters stay counted)."""
    multiprocess.mark_process_dead(pid, directory)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every unary and client-streaming RPC by method and final status code."""

    def __init__(self, service: str):
        self.service = service

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        service = self.service

        def observe(fn):
            def wrapped(request, context):
                started = time.perf_counter()
                code = "OK"
                try:
                    return fn(request, context)
                except Exception:
                    code = (context.code() or grpc.StatusCode.UNKNOWN).name
                    raise
                finally:
                    RPC_REQUESTS.labels(service, method, code).inc()
                    RPC_SECONDS.labels(service, method).observe(time.perf_counter() - started)
            return wrapped

        if handler.unary_unary:
            return handler._replace(unary_unary=observe(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=observe(handler.stream_unary))
        return handler
