"""kill -9 of fusion during ingest, repeated: no acknowledged event is lost, on either backend.

The short form (4 trials per backend) lives in tests/integration/test_fusion_server.py; this is
its long variant, with the same procedure (`_kill_trials`) and more trials."""

from __future__ import annotations

import pytest

from tools.stack import start_stack
from tests.integration.test_fusion_server import _kill_trials

TRIALS = 15


@pytest.fixture(scope="module")
def embedding(model_repo, tmp_path_factory):
    procs = start_stack(tmp_path_factory.mktemp("crash"), str(model_repo), names=("embedding",))
    yield procs
    assert procs["embedding"].stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_repeated_sigkill_during_ingest_loses_no_acknowledged_event(
        backend, embedding, model_repo, amazon_users, tmp_path, start_redis):
    args = ["--model-repo", str(model_repo), "--embedding-address",
            embedding["embedding"].address]
    if backend == "sqlite":
        args += ["--sqlite-path", str(tmp_path / "crash.sqlite3")]
    else:
        args += ["--store", "redis", "--redis-url", start_redis().url]
    lost, acked = _kill_trials(embedding, args, TRIALS, amazon_users, tmp_path)
    print(f"\n{backend}: {TRIALS} SIGKILL trials, {acked} acknowledged events, {lost} lost")
    assert acked > 0
    assert lost == 0, f"{lost} of {acked} acknowledged events were lost"
