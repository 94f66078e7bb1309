"""Helpers of the reliability suite: request builders, process probes (RSS, freeze), health
watching from a side thread, closed-loop callers and the figures they print."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crossrec.common.v1 import common_pb2
from crossrec.ranking.v1 import ranking_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Codes a service may answer to a bad request; everything else (INTERNAL, UNKNOWN...) is a bug.
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


def pb_event(e: dict) -> common_pb2.BehaviorEvent:
    return common_pb2.BehaviorEvent(**{k: v for k, v in e.items() if v is not None})


def pb_item(r: dict) -> ranking_pb2.Item:
    return ranking_pb2.Item(item_id=r["item_id"], platform=r["platform"], title=r["title"],
                            attributes=r.get("attributes") or {})


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def health_of(address: str, timeout_s: float = 1.0) -> int | grpc.StatusCode:
    """The health status of `address`, or the status code of the failed Check."""
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s).status
        except grpc.RpcError as err:
            return err.code()


def is_alive_and_serving(proc) -> bool:
    return proc.proc.poll() is None and health_of(proc.address, 5.0) == SERVING


@contextmanager
def frozen(pid: int):
    """SIGSTOP a process for the block (a hung dependency), SIGCONT it whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def rpc_outcome(fn: Callable, *args, **kwargs) -> tuple[grpc.StatusCode, str, float, object]:
    """(code, details, seconds, reply or None) of one call; never raises grpc.RpcError."""
    started = time.perf_counter()
    try:
        reply = fn(*args, **kwargs)
        return grpc.StatusCode.OK, "", time.perf_counter() - started, reply
    except grpc.RpcError as err:
        return err.code(), err.details() or "", time.perf_counter() - started, None


class HealthWatch:
    """Watches health from a side thread: a Watch stream records every status it is sent
    (stopping at NOT_SERVING, so it never holds a drain open) and a poller records what
    Check answers every `poll_s` (a status, or the error code once nothing answers)."""

    def __init__(self, address: str, poll_s: float = 0.02, limit_s: float = 60.0):
        self.address = address
        self.watched: list[tuple[float, int]] = []
        self.polled: list[tuple[float, object]] = []
        self.not_serving_at: float | None = None
        self._serving = threading.Event()
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(address)
        self._watch = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=limit_s)
        self._threads = [threading.Thread(target=self._follow, daemon=True),
                         threading.Thread(target=self._poll, args=(poll_s, limit_s),
                                          daemon=True)]
        for t in self._threads:
            t.start()
        if not self._serving.wait(10):
            raise RuntimeError(f"health Watch on {address} never said SERVING")

    def _follow(self) -> None:
        try:
            for reply in self._watch:
                now = time.monotonic()
                self.watched.append((now, reply.status))
                if reply.status == SERVING:
                    self._serving.set()
                elif reply.status == NOT_SERVING:
                    self.not_serving_at = now
                    self._watch.cancel()
                    return
        except grpc.RpcError:
            return

    def _poll(self, poll_s: float, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError as err:
                    status = err.code()
                self.polled.append((time.monotonic(), status))
                self._stop.wait(poll_s)

    def wait_not_serving(self, timeout_s: float) -> float | None:
        self._threads[0].join(timeout_s)
        return self.not_serving_at

    def close(self) -> None:
        self._stop.set()
        self._watch.cancel()
        for t in self._threads:
            t.join(5)
        self._channel.close()

    def polled_serving_after(self, t: float) -> bool:
        """Whether Check said SERVING after `t` (the first moment it said anything else)."""
        return any(at > t and status == SERVING for at, status in self.polled)


@dataclass
class Call:
    n: int
    started: float
    ended: float
    code: grpc.StatusCode
    details: str


@dataclass
class ClosedLoop:
    """`callers` threads each calling `call(channel, n)` back to back until told to stop,
    a call fails UNAVAILABLE (the server is gone), or `limit_s` passes; every call recorded."""
    address: str
    call: Callable[[grpc.Channel, int], object]
    callers: int
    limit_s: float = 60.0
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(self.callers)]

    def start(self) -> "ClosedLoop":
        for t in self._threads:
            t.start()
        return self

    def _run(self, caller: int) -> None:
        deadline = time.monotonic() + self.limit_s
        with grpc.insecure_channel(self.address) as channel:
            n = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    self.call(channel, caller * 100_000 + n)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as err:
                    code, details = err.code(), err.details() or ""
                with self._lock:
                    self.calls.append(Call(caller * 100_000 + n, started, time.monotonic(),
                                           code, details))
                n += 1
                if code == grpc.StatusCode.UNAVAILABLE:
                    return

    def ok_count(self) -> int:
        return sum(c.code == grpc.StatusCode.OK for c in self.calls)

    def wait_ok(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.ok_count() < n and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.ok_count() < n:
            raise RuntimeError(f"only {self.ok_count()} of {n} warm-up calls succeeded: "
                               f"{[c.code for c in self.calls[-5:]]}")

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)
