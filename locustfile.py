"""Locust load test for crossrec: a gRPC user class for teams that run their load tests in locust.

    locust -f locustfile.py --headless -u 8 -r 8 -t 20s \\
        --ranking 127.0.0.1:50053 --fusion 127.0.0.1:50052 [--tags recommend] [--csv out]

Each simulated user holds a CrossrecClient (clients/crossrec_client/) and, back to back
(`--think-s` apart), sends Recommend (weight 8), Ingest (1) and GetProfile (1) for real users
and items from ../shared/data (dataio/, as tools/loadtest.py draws them); every
call goes to locust's request event with its response time and its CrossrecError, if any.
Retries are off, so every failure shows. Targets must be loopback addresses, as for
tools/loadtest.py: anything else is refused before a request is sent. Bound the run with
`-t`; `--tags recommend` (or ingest, profile) keeps one RPC. Without `--headless`, the web UI
(http://127.0.0.1:8089) drives it.
"""

from __future__ import annotations

import random
import sys
import time

# gRPC's C core must use gevent (which locust has patched the standard library with) before
# any channel exists; otherwise a blocking call stalls every simulated user of the process.
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, events, tag, task

grpc_gevent.init_gevent()

from clients.crossrec_client import CrossrecClient, CrossrecError  # noqa: E402
from tools.loadtest import Workload, check_loopback  # noqa: E402

_workload: Workload | None = None


@events.init_command_line_parser.add_listener
def _flags(parser) -> None:
    parser.add_argument("--ranking", default="127.0.0.1:50053",
                        env_var="CROSSREC_RANKING_ADDRESS",
                        help="crossrec ranking service host:port (loopback only)")
    parser.add_argument("--fusion", default="127.0.0.1:50052",
                        env_var="CROSSREC_FUSION_ADDRESS",
                        help="crossrec fusion service host:port (loopback only)")
    parser.add_argument("--data-users", type=int, default=500,
                        help="draw requests from the first N real users of the data set")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="deadline of every call")
    parser.add_argument("--think-s", type=float, default=0.0,
                        help="wait between one user's calls (0: back to back, closed loop)")
    parser.add_argument("--seed", type=int, default=0)


@events.init.add_listener
def _init(environment, **_kw) -> None:
    global _workload
    options = environment.parsed_options
    if options is None:  # imported by a tool, not run by locust
        return
    try:
        for address in (options.ranking, options.fusion):
            check_loopback(address)
    except ValueError as err:  # before any user starts
        sys.exit(f"error: {err}")
    _workload = Workload.from_data(options.data_users, options.seed)
    CrossrecUser.wait_time = constant(options.think_s)


class CrossrecUser(User):
    """One backend caller of crossrec with its own channels."""

    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.client = CrossrecClient(fusion=options.fusion, ranking=options.ranking,
                                     timeout_s=options.timeout_s, retry=None)
        self.rng = random.Random(options.seed + id(self))

    def on_stop(self) -> None:
        self.client.close()

    def _call(self, name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        error, result = None, None
        try:
            result = fn(*args, **kwargs)
        except CrossrecError as err:
            error = err
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=0, exception=error, context={})
        return result

    @tag("recommend")
    @task(8)
    def recommend(self) -> None:
        w = _workload
        self._call("Recommend", self.client.ranking.recommend, self.rng.choice(w.users),
                   self.rng.choice(w.platforms), k=10, exclude_seen=True)

    @tag("ingest")
    @task(1)
    def ingest(self) -> None:
        event = dict(self.rng.choice(_workload.events))
        event["event_id"] = f"locust-{time.time_ns()}-{self.rng.random()}"
        self._call("Ingest", self.client.fusion.ingest, [event])

    @tag("profile")
    @task(1)
    def profile(self) -> None:
        w = _workload
        self._call("GetProfile", self.client.fusion.profile, self.rng.choice(w.users),
                   for_platform=self.rng.choice(w.platforms))
