"""Starts crossrec services as local processes on loopback and stops them cleanly.

Used by `make up` / `make down`, the demo, the integration tests and the benchmarks:
`python -m tools.stack up|down|status --run-dir var/run`. The Redis servers and clusters that
tests and benchmarks start beside the services are tools/redis_server.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.crossrec_client import ClientSecurity

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


def free_port() -> int:
    """A port on 127.0.0.1 free now (another process may take it before it is bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
