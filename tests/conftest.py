"""Shared fixtures: the model repository built by `make models`, real titles, server launcher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.stack import ServiceProcess
from dataio import AMAZON, sample_titles, user_events
from recmodel import modelrepo

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.redis_fixture"]


@pytest.fixture(scope="session")
def model_repo() -> Path:
    repo = Path(os.environ.get("CROSSREC_MODEL_REPO", REPO / "models"))
    if not modelrepo.versions(repo, "encoder"):
        pytest.fail(f"no encoder version in {repo}: run `make models` (`make test` does)")
    return repo


@pytest.fixture(scope="session")
def encoder_dir(model_repo: Path) -> Path:
    return modelrepo.resolve(model_repo, "encoder")


@pytest.fixture(scope="session")
def titles() -> list[str]:
    """64 real Amazon item titles (fixed sample)."""
    return sample_titles(64, seed=1)


@pytest.fixture(scope="session")
def amazon_users() -> dict[str, list[dict]]:
    """The history events of the first 20 real Amazon users, as BehaviorEvent fields."""
    return user_events(AMAZON, users=20)


@pytest.fixture
def amazon_user(amazon_users) -> list[dict]:
    """One real user's history on both platforms."""
    return next(iter(amazon_users.values()))


@pytest.fixture
def start_service(tmp_path):
    """Start a real server process on loopback; every one is SIGTERMed and must exit 0."""
    started: list[ServiceProcess] = []

    def start(name: str, *args: str, env: dict | None = None,
              timeout_s: float = 120.0) -> ServiceProcess:
        proc = ServiceProcess(name, list(args), tmp_path / f"run-{name}-{len(started)}", env)
        started.append(proc)
        return proc.start().wait_ready(timeout_s)

    yield start
    codes = {p.name: p.stop() for p in reversed(started)}
    assert all(code == 0 for code in codes.values()), f"unclean exits: {codes}"
