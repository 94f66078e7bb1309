"""A real redis-server on loopback for tests: `redis_url` (shared) and `start_redis` (own).

Load with `pytest_plugins = ["tests.redis_fixture"]`; do not import it from a test module as
well, or pytest cannot rewrite its asserts.
"""

from __future__ import annotations

import pytest

from clients.stack import RedisServer


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
