"""A real redis-server on loopback for tests: `redis_url` (shared) and `start_redis` (own).

Load with `pytest_plugins = ["tests.redis_fixture"]`; do not import it from a test module as
well, or pytest cannot rewrite its asserts.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1 with its data in `data_dir`.

    Durable like production: `appendonly yes`, `appendfsync always`, no RDB snapshots.
    `start()` again after `stop()` or `kill()` reuses the directory (and the port when free),
    which is how tests restart a server on its own data.
    """

    def __init__(self, data_dir: Path, *extra_args: str):
        self.data_dir = Path(data_dir)
        self.extra_args = list(extra_args)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH: run `make setup` "
                        "(it installs the redis-server Debian package)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The free port can be taken between probing and binding: try a few.
        for attempt in range(5):
            port = self.port if (attempt == 0 and self.port) else _free_port()
            if self._launch(binary, port):
                self.port = port
                return self
        pytest.fail(f"redis-server did not answer PING; log: {self.data_dir / 'redis.log'}:\n"
                    + self._log_tail())

    def _launch(self, binary: str, port: int) -> bool:
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log"),
             *self.extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if _answers_ping(port):
                return True
            time.sleep(0.02)
        self.kill()
        return False

    def _log_tail(self) -> str:
        try:
            return "\n".join((self.data_dir / "redis.log").read_text().splitlines()[-20:])
        except OSError:
            return "(no log)"

    def stop(self) -> int:
        """SIGTERM (Redis fsyncs and exits); exit code."""
        if self.proc is None:
            return 0
        self.proc.terminate()
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown work, as in a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """URL of a redis-server started for this test session; tests isolate by key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def start_redis(tmp_path):
    """Starts a test's own redis-server (extra args appended), for crash, restart and config
    tests; every one is stopped at teardown."""
    servers: list[RedisServer] = []

    def start(*extra_args: str) -> RedisServer:
        servers.append(RedisServer(tmp_path / f"redis-{len(servers)}", *extra_args).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
