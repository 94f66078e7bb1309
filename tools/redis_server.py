"""Redis on loopback for tests and benchmarks: a durable redis-server process (RedisServer)
and a Redis Cluster of them (RedisClusterServers), started and stopped like the services in
tools/stack.py."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tools.stack import free_port

REDIS_START_TIMEOUT_S = 10.0
REDIS_STOP_TIMEOUT_S = 10.0


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
    which is how tests restart a server on its own data. `cluster_node_timeout_ms` > 0 makes
    it a Redis Cluster node (its state in `nodes.conf` beside the data; the cluster bus on a
    port of its own, `bus_port`), to be joined by RedisClusterServers.
    """

    def __init__(self, data_dir: Path, *extra_args: str, cluster_node_timeout_ms: int = 0):
        self.data_dir = Path(data_dir)
        self.extra_args = list(extra_args)
        self.cluster_node_timeout_ms = cluster_node_timeout_ms
        self.port = 0
        self.bus_port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH: run `make setup` "
                               "(it installs the redis-server Debian package)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The free port can be taken between probing and binding: try a few.
        for attempt in range(5):
            reuse = attempt == 0 and self.port
            port = self.port if reuse else free_port()
            bus_port = self.bus_port if reuse else free_port()
            if self._launch(binary, port, bus_port):
                self.port, self.bus_port = port, bus_port
                return self
        raise RuntimeError(f"redis-server did not answer PING; log: "
                           f"{self.data_dir / 'redis.log'}:\n" + self._log_tail())

    def _launch(self, binary: str, port: int, bus_port: int) -> bool:
        cluster = []
        if self.cluster_node_timeout_ms:
            cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                       "--cluster-node-timeout", str(self.cluster_node_timeout_ms),
                       "--cluster-port", str(bus_port)]
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log"),
             *cluster, *self.extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
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
            return self.proc.wait(REDIS_STOP_TIMEOUT_S)
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


class RedisClusterServers:
    """A Redis Cluster on 127.0.0.1: `primaries` primaries with `replicas` replicas each, every
    node a durable RedisServer (data under `data_dir/node-<i>`), joined by
    `redis-cli --cluster create`. `node_timeout_ms` is how long a silent primary takes to be
    declared failed (its replica is promoted about a second later).
    """

    def __init__(self, data_dir: Path, primaries: int = 3, replicas: int = 1,
                 node_timeout_ms: int = 1000, *extra_args: str):
        self.primaries, self.replicas = primaries, replicas
        # A replica syncs at once (the default waits 5 s for more replicas to share one
        # transfer); a lost shard stops only its own slots, the others keep serving.
        args = ["--repl-diskless-sync-delay", "0", "--cluster-require-full-coverage", "no",
                *extra_args]
        self.nodes = [RedisServer(Path(data_dir) / f"node-{i}", *args,
                                  cluster_node_timeout_ms=node_timeout_ms)
                      for i in range(primaries * (1 + replicas))]

    @property
    def url(self) -> str:
        """redis+cluster:// URL seeded by a running node."""
        return f"redis+cluster://127.0.0.1:{self.live()[0].port}"

    def live(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.proc is not None]

    def start(self, timeout_s: float = 30.0) -> RedisClusterServers:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not on PATH: run `make setup` (the redis-server "
                               "Debian package brings it with redis-tools)")
        try:
            for node in self.nodes:
                node.start()
            if len(self.nodes) == 1:  # redis-cli creates clusters of 3 primaries or more
                with self._client(self.nodes[0]) as client:
                    client.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
            else:
                # The first `primaries` nodes become primaries, the rest their replicas.
                subprocess.run([cli, "--cluster", "create",
                                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                                "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                               check=True, capture_output=True, timeout=timeout_s)
            self.wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _client(self, node: RedisServer):
        import redis  # the plain client: only cluster tests and benchmarks need it
        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=2.0)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every running node says cluster_state:ok, sees `primaries` primaries that
        all run, and every replica's link to its primary is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if all(self._node_ok(node) for node in self.live()):
                    return
            except OSError:
                pass
            except Exception as err:  # noqa: BLE001 - a redis error while the cluster settles
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"cluster not ok: {err}") from err
            if time.monotonic() >= deadline:
                raise RuntimeError(f"cluster not ok after {timeout_s:.0f} s")
            time.sleep(0.05)

    def _node_ok(self, node: RedisServer) -> bool:
        with self._client(node) as client:
            if client.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                return False
            running = {n.port for n in self.live()}
            primaries = [p for p in self.primary_ports(client) if p in running]
            info = client.info("replication")
        return len(primaries) == self.primaries and (
            info["role"] == "master" or info.get("master_link_status") == "up")

    @staticmethod
    def primary_ports(client) -> list[int]:
        """Ports of the primaries that serve slots, as `client`'s node sees the cluster."""
        return sorted({int(r[2][1]) for r in client.execute_command("CLUSTER SLOTS")})

    def primary_of(self, key: str) -> RedisServer:
        """The running node that serves `key`'s slot now."""
        with self._client(self.live()[0]) as client:
            slot = client.execute_command("CLUSTER KEYSLOT", key)
            port = next(int(r[2][1]) for r in client.execute_command("CLUSTER SLOTS")
                        if int(r[0]) <= slot <= int(r[1]))
        return next(node for node in self.nodes if node.port == port)

    def replica_of(self, primary: RedisServer) -> RedisServer:
        """The (first) replica attached to `primary` now."""
        with self._client(primary) as client:
            port = int(client.info("replication")["slave0"]["port"])
        return next(node for node in self.nodes if node.port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
