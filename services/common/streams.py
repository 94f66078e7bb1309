"""Long-lived streams kept apart from unary calls: a cap per streaming method, threads of
their own, and an idle timeout for streams the client feeds.

Why: a sync gRPC server runs every call on a worker thread, and a stream holds its thread for
as long as it is open. Sixty-four idle reflection streams, opened without a token, once held
all 64 workers of a server: every unary call, health Check included, then waited until its
deadline while the health-only port kept answering SERVING. So:

- each streaming method (reflection, health Watch, fusion's IngestStream) may have at most
  `max_streams` streams open at once; one more is refused with RESOURCE_EXHAUSTED at once;
- blocking streams run on a thread pool of their own (`max_streams` threads per streaming
  method), never on the `--workers` pool that unary calls use, so open streams never take
  the threads of unary calls. gRPC counts them against `--max-concurrent-rpcs` like any
  call (a non-blocking health Watch excepted once it has started), so of the default 512
  slots they can hold at most `max_streams` per method (16 x 2 for fusion's reflection and
  IngestStream); serve() warns when the flags leave unary calls no slot;
- a stream whose client has sent nothing for `idle_timeout_s` (reflection, IngestStream) is
  cancelled, which frees its thread; the client sees CANCELLED. health Watch is exempt: its
  client never sends after the request, by design, and grpcio-health-checking serves it
  without holding a thread (only the cap applies).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from concurrent import futures

import grpc
from google.protobuf import descriptor_pool

log = logging.getLogger("crossrec")

# Streaming methods a crossrec server has at most: reflection, health Watch, IngestStream.
# The stream pool and the extra concurrency slots are sized for that many; serve() checks it.
STREAM_METHODS = 3


@dataclass
class _Open:
    method: str
    context: grpc.ServicerContext
    idle_timeout: bool
    last_seen: float


def streaming_methods(service_names: list[str]) -> list[str]:
    """Full names of the streaming methods of the named services (registered descriptors)."""
    pool = descriptor_pool.Default()
    return [m.full_name for name in service_names
            for m in pool.FindServiceByName(name).methods
            if m.client_streaming or m.server_streaming]


class StreamGuard(grpc.ServerInterceptor):
    """Caps open streams per method and cancels idle client-fed streams (module docstring).

    `idle_timeout_s` 0 turns the idle timeout off. Thread-safe; one reaper thread checks the
    open streams every `check_s` seconds (default: a quarter of the timeout, at most 1 s).
    """

    def __init__(self, max_streams: int, idle_timeout_s: float, check_s: float | None = None,
                 name: str = "crossrec"):
        if max_streams < 1:
            raise ValueError(f"--max-streams must be >= 1, got {max_streams}")
        if idle_timeout_s < 0:
            raise ValueError(f"--stream-idle-timeout-s must be >= 0, got {idle_timeout_s}")
        self.max_streams, self.idle_timeout_s = max_streams, idle_timeout_s
        # Threads streams may take at most; they start on demand.
        self.slots = max_streams * STREAM_METHODS
        self.pool = futures.ThreadPoolExecutor(max_workers=self.slots,
                                               thread_name_prefix=f"{name}-stream")
        self._lock = threading.Lock()
        self._per_method: dict[str, int] = defaultdict(int)
        self._open: dict[int, _Open] = {}
        self._tokens = iter(range(1, 2**62))
        self._stop = threading.Event()
        if idle_timeout_s > 0:
            self._check_s = check_s or min(1.0, idle_timeout_s / 4)
            threading.Thread(target=self._reap, name="stream-reaper", daemon=True).start()

    def open_streams(self, method: str | None = None) -> int:
        with self._lock:
            return (sum(self._per_method.values()) if method is None
                    else self._per_method.get(method, 0))

    def close(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- bookkeeping ----------------------------------------------------------------------
    def _enter(self, method: str, context, idle_timeout: bool) -> int:
        with self._lock:
            admitted = self._per_method[method] < self.max_streams
            if admitted:
                self._per_method[method] += 1
                token = next(self._tokens)
                self._open[token] = _Open(method, context, idle_timeout, time.monotonic())
        if not admitted:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{method.rsplit('/', 1)[-1]}: {self.max_streams} streams already "
                          "open on this server (--max-streams); close one or retry later")
        return token

    def _leave(self, token: int) -> None:
        with self._lock:
            entry = self._open.pop(token, None)
            if entry is not None:
                self._per_method[entry.method] -= 1

    def _seen(self, token: int) -> None:
        entry = self._open.get(token)
        if entry is not None:
            entry.last_seen = time.monotonic()

    def _watched(self, requests, token: int):
        for request in requests:
            self._seen(token)
            yield request

    def _reap(self) -> None:
        while not self._stop.wait(self._check_s):
            cutoff = time.monotonic() - self.idle_timeout_s
            with self._lock:
                idle = [(t, e) for t, e in self._open.items()
                        if e.idle_timeout and e.last_seen < cutoff]
            for token, entry in idle:
                log.info("idle stream cancelled", extra={"fields": {
                    "method": entry.method, "idle_timeout_s": self.idle_timeout_s}})
                entry.context.cancel()
                self._leave(token)

    # --- the interceptor ------------------------------------------------------------------
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        method = handler_call_details.method
        if handler.stream_unary:
            return handler._replace(stream_unary=self._stream_unary(method,
                                                                    handler.stream_unary))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._stream_stream(method,
                                                                      handler.stream_stream))
        return handler._replace(unary_stream=self._unary_stream(method, handler.unary_stream))

    # A blocking stream runs on self.pool (gRPC's experimental_thread_pool attribute): this
    # must be the outermost interceptor, or a later wrapper would hide the attribute.
    def _stream_unary(self, method, inner):
        def guarded(request_iterator, context):
            token = self._enter(method, context, idle_timeout=True)
            try:
                return inner(self._watched(request_iterator, token), context)
            finally:
                self._leave(token)
        guarded.experimental_thread_pool = self.pool
        return guarded

    def _stream_stream(self, method, inner):
        def guarded(request_iterator, context):
            token = self._enter(method, context, idle_timeout=True)
            try:
                yield from inner(self._watched(request_iterator, token), context)
            finally:
                self._leave(token)
        guarded.experimental_thread_pool = self.pool
        return guarded

    def _unary_stream(self, method, inner):
        if getattr(inner, "experimental_non_blocking", False):
            # Returns at once and answers through the callback until the call ends, so the
            # slot is given back by the call's own close callback.
            def guarded(request, context, send_response_callback=None):
                token = self._enter(method, context, idle_timeout=False)
                if not context.add_callback(lambda: self._leave(token)):
                    self._leave(token)
                try:
                    return inner(request, context, send_response_callback=send_response_callback)
                except BaseException:
                    self._leave(token)
                    raise
            guarded.experimental_non_blocking = True
            guarded.experimental_thread_pool = getattr(inner, "experimental_thread_pool", None)
            return guarded

        def guarded_blocking(request, context):
            token = self._enter(method, context, idle_timeout=False)
            try:
                yield from inner(request, context)
            finally:
                self._leave(token)
        guarded_blocking.experimental_thread_pool = self.pool
        return guarded_blocking
