"""Starts crossrec services as local processes on loopback and stops them cleanly.

Used by `make up` / `make down`, the demo, the integration tests and the benchmarks:
`python -m tools.stack up|down|status --run-dir var/run`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.security import ClientSecurity

REPO = Path(__file__).resolve().parents[1]


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child Python: generated code and the repo on the path, offline hub."""
    env = dict(os.environ)
    path = [str(REPO / "gen"), str(REPO)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def health_status(address: str, timeout_s: float = 1.0, service: str = "",
                  security: ClientSecurity = ClientSecurity()) -> int | None:
    """grpc.health.v1 status of `address` (SERVING = 1), or None when it does not answer."""
    with security.channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return None
        return reply.status


class ServiceProcess:
    """One server process: `python -m services.<name>.server --port 0 --port-file F ...`."""

    def __init__(self, name: str, args: list[str], run_dir: str | os.PathLike,
                 env: dict[str, str] | None = None,
                 security: ClientSecurity = ClientSecurity()):
        self.name = name
        self.security = security
        self.args = list(args)
        self.run_dir = Path(run_dir)
        self.env = env
        self.port_file = self.run_dir / f"{name}.port"
        self.log_path = self.run_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "ServiceProcess":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", f"services.{self.name}.server", "--host", "127.0.0.1",
               "--port", "0", "--port-file", str(self.port_file), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=python_env(self.env), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout_s: float = 120.0) -> "ServiceProcess":
        """Block until health is SERVING; RuntimeError (with the log tail) on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if self.port is None and self.port_file.exists():
                self.port = int(self.port_file.read_text())
            if self.port and health_status(self.address, security=self.security) == \
                    health_pb2.HealthCheckResponse.SERVING:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not SERVING after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait for a graceful exit; SIGKILL after `timeout_s`. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL at once (crash tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


REDIS_START_TIMEOUT_S = 10.0
REDIS_STOP_TIMEOUT_S = 10.0


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
            port = self.port if reuse else _free_port()
            bus_port = self.bus_port if reuse else _free_port()
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


def service_args(name: str, model_repo: str, run_dir: Path, addresses: dict[str, str]) -> list[str]:
    """Flags of one service in a local stack, given the addresses of those already up."""
    args = ["--model-repo", model_repo]
    if name == "fusion":
        args += ["--embedding-address", addresses["embedding"],
                 "--sqlite-path", str(run_dir / "fusion.sqlite3")]
    if name == "ranking":
        args += ["--embedding-address", addresses["embedding"],
                 "--fusion-address", addresses["fusion"],
                 "--catalog-path", str(run_dir / "catalog.sqlite3")]
    return args


def start_stack(run_dir: Path, model_repo: str, names=("embedding", "fusion", "ranking"),
                extra: dict[str, list[str]] | None = None, env: dict[str, str] | None = None
                ) -> dict[str, ServiceProcess]:
    """Start `names` in dependency order on loopback and wait until each is SERVING; `extra`
    adds flags per service, `env` variables to every one."""
    procs: dict[str, ServiceProcess] = {}
    try:
        for name in names:
            args = service_args(name, model_repo, run_dir,
                                {n: p.address for n, p in procs.items()})
            procs[name] = ServiceProcess(name, args + (extra or {}).get(name, []),
                                         run_dir, env).start()
            procs[name].wait_ready()
    except BaseException:
        for proc in reversed(list(procs.values())):
            proc.stop()
        raise
    return procs


# The ports `up` binds: the servers' defaults, which the CLI and the client dial by default.
DEFAULT_PORTS = {"embedding": 50051, "fusion": 50052, "ranking": 50053}


def up(run_dir: Path, model_repo: str) -> dict:
    """Start every service on its default port, wait for SERVING, record pids and addresses
    in run_dir/stack.json."""
    state = {}
    fixed = {name: ["--port", str(port)] for name, port in DEFAULT_PORTS.items()}
    for name, proc in start_stack(run_dir, model_repo, extra=fixed).items():
        state[name] = {"pid": proc.proc.pid, "address": proc.address, "log": str(proc.log_path)}
        print(f"{name:10s} SERVING on {proc.address}  (log: {proc.log_path})")
    (run_dir / "stack.json").write_text(json.dumps(state, indent=2))
    return state


def down(run_dir: Path, timeout_s: float = 30.0) -> None:
    """SIGTERM every recorded service (reverse order) and wait for it to exit."""
    path = run_dir / "stack.json"
    if not path.exists():
        print("nothing running")
        return
    state = json.loads(path.read_text())
    for name, entry in reversed(list(state.items())):
        try:
            os.kill(entry["pid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(entry["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        print(f"{name:10s} stopped")
    path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--run-dir", default="var/run", help="pids, ports and logs")
    parser.add_argument("--model-repo", default=os.environ.get("CROSSREC_MODEL_REPO", "models"))
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if args.command == "up":
        up(run_dir, args.model_repo)
    elif args.command == "down":
        down(run_dir)
    else:
        path = run_dir / "stack.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        for name, entry in state.items():
            ok = health_status(entry["address"]) == health_pb2.HealthCheckResponse.SERVING
            print(f"{name:10s} {entry['address']:22s} {'SERVING' if ok else 'DOWN'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
