"""Real Redis on loopback for tests: `redis_url` (one server, shared) and `start_redis` (own);
`redis_cluster_url` (a Redis Cluster of 3 primaries + 3 replicas, shared) and
`start_redis_cluster` (own, for failover tests).

Load with `pytest_plugins = ["tests.redis_fixture"]`; do not import it from a test module as
well, or pytest cannot rewrite its asserts.
"""

from __future__ import annotations

import pytest

from tools.redis_server import RedisClusterServers, RedisServer


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


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory):
    """redis+cluster:// URL of a cluster (3 primaries, 3 replicas) started for this test
    session; tests isolate by key prefix and must leave every node running."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def start_redis_cluster(tmp_path):
    """Starts a test's own cluster (RedisClusterServers arguments), stopped at teardown."""
    clusters: list[RedisClusterServers] = []

    def start(**kwargs) -> RedisClusterServers:
        clusters.append(RedisClusterServers(tmp_path / f"cluster-{len(clusters)}",
                                            **kwargs).start())
        return clusters[-1]

    yield start
    for cluster in clusters:
        cluster.stop()
