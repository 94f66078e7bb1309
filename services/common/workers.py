"""Worker processes on one port: a parent forks N servers that bind the same port with
SO_REUSEPORT (grpc's examples/python/multiprocessing), supervises them (restarts one that
dies, forwards SIGTERM, exits 0 once all drained) and shares one page of state with them, so
that every worker's health says SERVING only while all of them are ready.

The parent creates no gRPC object or engine, ever: each worker builds its own server, engine
and connections after the fork. Its only thread, the metrics endpoint, starts after the
first forks (a restart forks beside it; the child uses nothing of it). The kernel spreads
connections, not calls, over the listening workers: a client's channel sticks to the worker
that accepted it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

from services.common import metrics
from services.common.flags import ServerConfig

log = logging.getLogger("crossrec")

STARTING, SERVING, DRAINING = 0, 1, 2
SUPERVISE_EVERY_S = 0.05
# A worker slot is restarted at most this often (a crash loop costs a core otherwise).
RESTART_EVERY_S = 1.0
# Past the drain grace, workers still running get this long before SIGKILL.
KILL_AFTER_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


class Worker:
    """A worker's view of its group: its index and the shared page (byte 0: the group's
    state, byte 1 + i: whether worker i is ready)."""

    def __init__(self, index: int, page: mmap.mmap):
        self.index, self._page = index, page

    def mark_ready(self) -> None:
        self._page[1 + self.index] = 1

    def group_serving(self) -> bool:
        return self._page[0] == SERVING


def default_processes() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound (not listening) to host:port with SO_REUSEPORT, held open for the
    parent's lifetime, so that `port` 0 picks one port for every worker and nothing else
    takes it between worker restarts."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    return sock, sock.getsockname()[1]


def write_port_file(path: str, port: int) -> None:
    """Write the bound `port` to `path` atomically (a reader never sees it half written);
    nothing when `path` is empty."""
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, path)


def _die_with_parent() -> None:
    """SIGTERM this worker when the parent dies (kill -9 of the parent leaves no orphan)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class _MetricsDir:
    """prometheus-client's multiprocess mode: every process writes its samples under one
    directory (emptied at start), the parent's endpoint adds them up."""

    def __init__(self, port: int, host: str):
        self.port, self.host = port, host
        given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.owned = not given
        self.path = given or tempfile.mkdtemp(prefix="crossrec-metrics-")
        Path(self.path).mkdir(parents=True, exist_ok=True)
        for stale in Path(self.path).glob("*.db"):
            stale.unlink()
        metrics.use_multiprocess(self.path)

    def serve(self) -> None:
        metrics.serve_multiprocess_metrics(self.port, self.host, self.path)

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)


def supervise(name: str, processes: int, config: ServerConfig,
              run_worker: Callable[[Worker, int], int]) -> int:
    """Fork `processes` workers on `config`'s address, each `run_worker(worker, port)` (its
    serve loop; returns its exit code), and supervise them until SIGTERM/SIGINT. Returns the
    exit code: 0 when every worker drained and exited 0; 1 when one failed before the group
    first served. The parent writes `config`'s port file and serves its metrics port."""
    try:
        reserved, port = reserve_port(config.host, config.port)
    except OSError as err:
        log.error("could not reserve %s:%s: %s", config.host, config.port, err)
        return 1
    metrics_dir = (_MetricsDir(config.metrics_port, config.metrics_host or config.host)
                   if config.metrics_port else None)
    page = mmap.mmap(-1, 1 + processes)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: stop.append(signum))

    def fork(index: int) -> int:
        return _fork_worker(name, index, page, reserved, port, run_worker)

    pids = {fork(i): i for i in range(processes)}
    started_at = {i: time.monotonic() for i in range(processes)}
    if metrics_dir is not None:
        metrics_dir.serve()  # only now: no thread of the parent's exists at the first forks
    served = False
    log.info("supervising", extra={"fields": {"service": name, "processes": processes,
                                              "port": port}})
    try:
        while not stop:
            for pid, index, code in _reap(pids):
                if metrics_dir is not None:
                    metrics.mark_process_dead(pid, metrics_dir.path)
                if not served:
                    log.error("worker exited before the service was ready; stopping",
                              extra={"fields": {"worker": index, "exit": code}})
                    _stop_all(pids, page, config.grace_s)
                    return 1
                log.warning("worker died; restarting it", extra={"fields": {
                    "worker": index, "pid": pid, "exit": code}})
                time.sleep(max(0.0, started_at[index] + RESTART_EVERY_S - time.monotonic()))
                started_at[index] = time.monotonic()
                pids[fork(index)] = index
            ready = all(page[1 + i] for i in range(processes))
            page[0] = SERVING if ready else STARTING
            if ready and not served:
                served = True
                write_port_file(config.port_file, port)
                log.info("all workers serving", extra={"fields": {"service": name,
                                                                  "port": port}})
            time.sleep(SUPERVISE_EVERY_S)
        log.info("draining workers",
                 extra={"fields": {"service": name, "grace_s": config.grace_s}})
        return _stop_all(pids, page, config.grace_s)
    finally:
        reserved.close()
        if metrics_dir is not None:
            metrics_dir.close()


def _fork_worker(name: str, index: int, page: mmap.mmap, reserved: socket.socket, port: int,
                 run_worker: Callable[[Worker, int], int]) -> int:
    """Fork worker `index`: the child runs `run_worker` and exits with its code (never
    returns); the parent gets the child's pid."""
    page[1 + index] = 0
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            _die_with_parent()
            reserved.close()
            code = run_worker(Worker(index, page), port)
        except SystemExit as err:  # e.g. a refusal to start, with its reason
            if not isinstance(err.code, int):
                log.error(str(err.code), extra={"fields": {"worker": index}})
            code = err.code if isinstance(err.code, int) else 1
        except BaseException:  # noqa: BLE001 - a worker reports, never unwinds the parent's stack
            log.exception("worker failed", extra={"fields": {"worker": index}})
        finally:
            logging.shutdown()
            os._exit(code)
    log.info("worker started", extra={"fields": {"service": name, "worker": index,
                                                 "pid": pid}})
    return pid


def _reap(pids: dict[int, int]) -> list[tuple[int, int, int]]:
    """(pid, worker index, exit code) of every worker that has exited, removed from `pids`."""
    gone = []
    while pids:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        if pid in pids:
            gone.append((pid, pids.pop(pid), os.waitstatus_to_exitcode(status)))
    return gone


def _stop_all(pids: dict[int, int], page: mmap.mmap, grace_s: float) -> int:
    """NOT_SERVING everywhere, SIGTERM every worker, wait for them (SIGKILL past the grace);
    0 when every one exited 0."""
    page[0] = DRAINING
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s + KILL_AFTER_GRACE_S
    codes = []
    while pids:
        codes += [code for _, _, code in _reap(pids)]
        if pids and time.monotonic() > deadline:
            log.error("workers still running past the grace; killing them",
                      extra={"fields": {"pids": list(pids)}})
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(SUPERVISE_EVERY_S)
    failed = [c for c in codes if c != 0]
    if failed:
        log.error("workers exited uncleanly", extra={"fields": {"codes": failed}})
    return 1 if failed else 0
