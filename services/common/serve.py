"""The serve loop every crossrec server shares (its flags: `ServerConfig`, services/common/
flags.py): JSON logs, health (also on an optional plaintext health-only port), reflection,
bounded concurrency (streams apart: services/common/streams.py), undecodable-request handling
and graceful shutdown."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Callable

import grpc
from google.protobuf import message as pb_message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clients.crossrec_client.limits import MAX_MESSAGE_BYTES
from clients.crossrec_client.security import ClientSecurity
from services.common import metrics, tracing
from services.common.errors import EngineError, status_name
from services.common.flags import ServerConfig
from services.common.security import (ConfigError, TokenAuthInterceptor, read_token,
                                      server_credentials)
from services.common.streams import STREAM_METHODS, StreamGuard, streaming_methods
from services.common.wire import find_bad_field
from services.common.workers import write_port_file

log = logging.getLogger("crossrec")
# The health-only port answers probes and nothing else: a few threads, a small cap (Watch
# streams count against it too).
HEALTH_WORKERS = 2
HEALTH_MAX_CONCURRENT_RPCS = 32
HEALTH_CLOSE_GRACE_S = 0.5
# How often a worker process re-reads its group's state (services/common/workers.py).
GROUP_POLL_S = 0.02
# How often the main thread looks for SIGTERM / SIGINT once serving (the drain starts within it).
SIGNAL_POLL_S = 0.1
# Trailing metadata naming the worker process that answered (worker processes only).
WORKER_METADATA_KEY = "crossrec-worker"


def client_security(config: ServerConfig) -> ClientSecurity:
    """How this server dials the services it depends on: the same token it checks."""
    return ClientSecurity(config.upstream_tls_ca, config.upstream_tls_cert,
                          config.upstream_tls_key, read_token(config.auth_token_file))


class _JsonFormatter(logging.Formatter):
    def __init__(self, fields: dict):
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname,
                 "logger": record.name, "msg": record.getMessage(), **self.fields}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str, **fields) -> None:
    """JSON lines on stderr; `fields` go into every line (a worker process's index)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter(fields))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def abort_on_error(context: grpc.ServicerContext, err: Exception):
    """Abort the RPC with the status the errors table gives `err` (raises)."""
    name = status_name(err)
    if name == "INTERNAL":
        log.exception("internal error")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}")
    context.abort(getattr(grpc.StatusCode, name), str(err))


def engine_call(context: grpc.ServicerContext, fn: Callable, *args, **kwargs):
    """Run an engine call, mapping EngineError and anything unexpected to a gRPC status."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - every error becomes a status, never a crash
        if not isinstance(err, EngineError):
            log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
        abort_on_error(context, err)


def wait_for(fn: Callable, timeout_s: float, what: str):
    """Call `fn` until it stops raising EngineError (a dependency still starting), bounded."""
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        try:
            return fn()
        except EngineError as err:
            if time.monotonic() + delay > deadline:
                raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s: {err}") from None
            log.info("waiting for dependency", extra={"fields": {"what": what, "error": str(err)}})
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class _Undecodable:
    """Stands for a request that failed to parse; the handler answers INVALID_ARGUMENT."""

    def __init__(self, field: str):
        self.field = field


class DecodeErrorInterceptor(grpc.ServerInterceptor):
    """Turns a request that does not parse (e.g. invalid UTF-8 in a string) into
    INVALID_ARGUMENT naming the field, instead of grpc's generic INTERNAL."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)

        def tolerant(data: bytes):
            try:
                return parse(data)
            except pb_message.DecodeError:
                field = find_bad_field(descriptor, data) if descriptor else "request"
                return _Undecodable(field or "request")

        def reject(bad: _Undecodable, context):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{bad.field}: not valid UTF-8 or malformed protobuf")

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary_unary(request, context):
                if isinstance(request, _Undecodable):
                    reject(request, context)
                return inner(request, context)
            return handler._replace(request_deserializer=tolerant, unary_unary=unary_unary)
        if handler.stream_unary:
            inner_stream = handler.stream_unary

            def stream_unary(request_iterator, context):
                def checked():
                    for request in request_iterator:
                        if isinstance(request, _Undecodable):
                            reject(request, context)
                        yield request
                return inner_stream(checked(), context)
            return handler._replace(request_deserializer=tolerant, stream_unary=stream_unary)
        return handler


class WorkerIdInterceptor(grpc.ServerInterceptor):
    """Names the worker process that answered in every unary call's trailing metadata
    (`crossrec-worker: <index>`), so that a client or a test can tell workers apart."""

    def __init__(self, index: int):
        self.metadata = ((WORKER_METADATA_KEY, str(index)),)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler.unary_unary:
            return handler
        inner, metadata = handler.unary_unary, self.metadata

        def unary_unary(request, context):
            context.set_trailing_metadata(metadata)
            return inner(request, context)
        return handler._replace(unary_unary=unary_unary)


def follow_group(worker, set_serving: Callable[[bool], None], stop: threading.Event) -> None:
    """A worker's health follows its group's: SERVING only while every worker is ready."""
    serving = None
    while not stop.is_set():
        now = worker.group_serving()
        if now != serving:
            set_serving(now)
            serving = now
        stop.wait(GROUP_POLL_S)


def health_only_server(health_servicer, host: str, port: int, name: str,
                       reuse_port: bool = False):
    """A plaintext server on `host:port` with only the given health servicer (no reflection,
    no token check), so that probes which cannot do TLS still read the real status. None when
    `port` is 0; OSError when the port cannot be bound. `reuse_port`: worker processes share
    the port (each answers with the group's status)."""
    if not port:
        return None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=HEALTH_WORKERS,
                                   thread_name_prefix=f"{name}-health"),
        maximum_concurrent_rpcs=HEALTH_MAX_CONCURRENT_RPCS,
        options=[("grpc.so_reuseport", int(reuse_port))])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"could not bind the health port {host}:{port}")
    return server


def serve(name: str, config: ServerConfig, register: Callable[[grpc.Server], list[str]],
          load: Callable[[], object], interceptors: tuple = (), worker=None) -> int:
    """Bind, answer health NOT_SERVING while `load()` runs, then SERVING until SIGTERM/SIGINT.

    `register(server)` adds the servicers and returns their full service names; `load()` loads
    and warms the engine and returns it (it is closed on shutdown). Returns the exit code.
    `worker` (services.common.workers.Worker): this is one of several worker processes on one
    port (SO_REUSEPORT); health is SERVING only while the whole group is, and the parent, not
    this process, writes the port file and serves the metrics.
    """
    try:
        token = read_token(config.auth_token_file)
        traced = tracing.setup(name, config.otlp_endpoint, config.trace_sample_ratio)
    except ConfigError as err:
        log.error(str(err))
        return 2
    server, services, streams, health_servicer = _grpc_server(
        name, config, register, traced, interceptors, token, worker)
    credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    address = f"{config.host}:{config.port}"
    port = (server.add_secure_port(address, credentials) if credentials
            else server.add_insecure_port(address))
    if port == 0:
        log.error("could not bind %s:%s", config.host, config.port)
        return 1
    try:
        health_server = health_only_server(health_servicer, config.host, config.health_port,
                                           name, reuse_port=worker is not None)
    except OSError as err:
        log.error(str(err))
        return 1

    if worker is None:
        metrics.serve_metrics(config.metrics_port, config.metrics_host or config.host)
    # The handler only appends: an Event.set() there can deadlock the main thread when the
    # signal lands while that thread holds the Event's lock inside stop.wait().
    signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: signals.append(signum))
    stop = threading.Event()
    server.start()
    if health_server is not None:
        health_server.start()
    log.info("listening", extra={"fields": {
        "service": name, "host": config.host, "port": port, "tls": bool(credentials),
        "mutual_tls": bool(config.tls_client_ca), "token_auth": bool(token),
        "open_reflection": bool(config.open_reflection or not token),
        "health_port": config.health_port, "metrics_port": config.metrics_port,
        "metrics_host": config.metrics_host or config.host,
        "max_streams": config.max_streams, "stream_idle_timeout_s": config.stream_idle_timeout_s}})

    started = time.monotonic()
    try:
        engine = load()
    except Exception:
        log.exception("loading failed")
        server.stop(0)
        streams.close()
        if health_server is not None:
            health_server.stop(0)
        return 1
    follower = _start_serving(name, config, port, services, health_servicer, worker, stop)
    log.info("serving", extra={"fields": {"service": name, "port": port,
                                           "load_s": round(time.monotonic() - started, 2)}})
    while not signals:
        time.sleep(SIGNAL_POLL_S)
    stop.set()
    if follower is not None:
        follower.join()
    _drain(name, config, server, health_servicer, health_server, streams, engine)
    return 0


def _grpc_server(name: str, config: ServerConfig,
                 register: Callable[[grpc.Server], list[str]], traced: tuple,
                 interceptors: tuple, token: str | None, worker):
    """The server before it binds: interceptors (`traced` from tracing.setup, `interceptors`
    the service's own, innermost), concurrency caps, the servicers `register` adds, health
    (NOT_SERVING) and reflection. (server, service names, stream guard, health servicer)."""
    auth = ((TokenAuthInterceptor(token, open_reflection=config.open_reflection),) if token
            else ())
    streams = StreamGuard(config.max_streams, config.stream_idle_timeout_s, name=name)
    # The stream guard comes first: its wrapper must be the outermost to run streams on their
    # own pool. gRPC counts open streams against maximum_concurrent_rpcs like any call (a
    # non-blocking health Watch excepted); the caps bound how many slots they can take.
    worker_id = () if worker is None else (WorkerIdInterceptor(worker.index),)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix=name),
        interceptors=(streams, *traced, metrics.MetricsInterceptor(name), *worker_id, *auth,
                      DecodeErrorInterceptor(), *interceptors),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", int(worker is not None))])
    services = register(server)
    stream_names = streaming_methods([*services, health_pb2.DESCRIPTOR.services_by_name[
        "Health"].full_name]) + [reflection.SERVICE_NAME]
    if len(stream_names) > STREAM_METHODS:
        raise RuntimeError(f"{len(stream_names)} streaming methods ({stream_names}): raise "
                           "services.common.streams.STREAM_METHODS to match")
    if config.max_concurrent_rpcs <= config.max_streams * len(stream_names):
        log.warning("open streams could take every concurrency slot: --max-concurrent-rpcs "
                    "%d <= --max-streams %d x %d streaming methods",
                    config.max_concurrent_rpcs, config.max_streams, len(stream_names))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ["", *services]:
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    metrics.READY.labels(name).set(0)  # a server stuck loading shows as 0, not as absent
    reflection.enable_server_reflection(
        [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    return server, services, streams, health_servicer


def _start_serving(name: str, config: ServerConfig, port: int, services: list[str],
                   health_servicer, worker, stop: threading.Event) -> threading.Thread | None:
    """Health SERVING and the port file, or for a worker process: ready in the group's page
    and a thread that follows the group's state until `stop` (returned, to join)."""

    def set_serving(serving: bool) -> None:
        for service in ["", *services]:
            health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING if serving
                                else health_pb2.HealthCheckResponse.NOT_SERVING)
        metrics.READY.labels(name).set(int(serving))

    if worker is None:
        set_serving(True)
        write_port_file(config.port_file, port)
        return None
    worker.mark_ready()
    follower = threading.Thread(target=follow_group, args=(worker, set_serving, stop),
                                name=f"{name}-group", daemon=True)
    follower.start()
    return follower


def _drain(name: str, config: ServerConfig, server: grpc.Server, health_servicer,
           health_server: grpc.Server | None, streams: StreamGuard, engine) -> None:
    """Graceful shutdown: NOT_SERVING, in-flight calls finish within the grace, then the
    health port, the stream pool, the engine and the tracer close."""
    log.info("draining", extra={"fields": {"service": name, "grace_s": config.grace_s}})
    health_servicer.enter_graceful_shutdown()
    metrics.READY.labels(name).set(0)
    server.stop(config.grace_s).wait()
    if health_server is not None:
        # Only now: probes read NOT_SERVING there for the whole drain, not a refused port; and
        # a moment more, so that an open Watch stream is sent its NOT_SERVING before it is
        # cancelled (stop(0) could cancel it with the update still queued).
        health_server.stop(HEALTH_CLOSE_GRACE_S).wait()
    streams.close()
    close = getattr(engine, "close", None)
    if close:
        close()
    tracing.shutdown()
    log.info("stopped", extra={"fields": {"service": name}})
