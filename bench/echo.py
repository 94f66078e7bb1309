"""A bare gRPC server with the services' settings that returns the request bytes: the ceiling
bench/e2e.py measures any Python gRPC service on this box against.

    .venv/bin/python -m bench.echo --port-file F     (bench.e2e starts it with start_echo)
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc

from tools.loadtest import ECHO_METHOD
from tools.stack import python_env


def serve_echo(port_file: str) -> int:
    """Serve on 127.0.0.1 (port written to `port_file`) until SIGTERM."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64),
                         maximum_concurrent_rpcs=512)
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    service, method = ECHO_METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        service, {method: handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    # As in services/common/serve.py: the handler only appends (an Event.set() there can
    # deadlock a main thread inside Event.wait()).
    signals: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: signals.append(signum))
    while not signals:
        time.sleep(0.1)
    server.stop(1).wait()
    return 0


def start_echo(run_dir: Path) -> tuple[subprocess.Popen, str]:
    """The echo server in a process of its own; (process, address)."""
    port_file = run_dir / "echo.port"
    proc = subprocess.Popen([sys.executable, "-m", "bench.echo", "--port-file",
                             str(port_file)], env=python_env())
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("echo server did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text()}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port-file", required=True)
    return serve_echo(p.parse_args(argv).port_file)


if __name__ == "__main__":
    sys.exit(main())
