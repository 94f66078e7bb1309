"""Common server flags: --threads (handler threads per process) still answers to its old
name --workers and to the old env twin, and the ranking service's --processes defaults to the
cores this process may use. Flags are declared once (services/common/flags.py): each config
field builds its flag, its env twin and its value in the frozen config."""

from __future__ import annotations

import dataclasses
import os

import pytest

from services.common import flags
from services.common.flags import ServerConfig


def parse(argv, env: dict[str, str], monkeypatch) -> ServerConfig:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (config,) = flags.parse(argv, ServerConfig, defaults={"port": 50053})
    return config


def test_threads_keeps_its_old_name_and_env_twin(monkeypatch):
    monkeypatch.delenv("CROSSREC_THREADS", raising=False)
    monkeypatch.delenv("CROSSREC_WORKERS", raising=False)
    assert parse([], {}, monkeypatch).threads == 64
    assert parse(["--workers", "8"], {}, monkeypatch).threads == 8
    assert parse(["--threads", "9"], {}, monkeypatch).threads == 9
    assert parse([], {"CROSSREC_WORKERS": "7"}, monkeypatch).threads == 7
    assert parse([], {"CROSSREC_WORKERS": "7", "CROSSREC_THREADS": "5"}, monkeypatch).threads == 5


def test_ranking_processes_default_to_the_usable_cores_and_has_an_env_twin(monkeypatch):
    from services.ranking.server import parse_args
    monkeypatch.delenv("CROSSREC_PROCESSES", raising=False)
    _, config = parse_args([])
    assert config.processes == len(os.sched_getaffinity(0))
    monkeypatch.setenv("CROSSREC_PROCESSES", "3")
    _, config = parse_args([])
    assert config.processes == 3


def test_ranking_refuses_fewer_than_one_process_as_a_usage_error(capsys):
    from services.ranking.server import parse_args
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--processes", "0"])
    assert exit_.value.code == 2
    assert "--processes must be at least 1, got 0" in capsys.readouterr().err


def test_service_defaults_override_the_shared_flags_and_the_config_is_frozen(monkeypatch):
    from services.ranking.server import DEFAULT_PORT, MAX_CONCURRENT_RPCS, parse_args
    monkeypatch.delenv("CROSSREC_PORT", raising=False)
    monkeypatch.delenv("CROSSREC_MAX_CONCURRENT_RPCS", raising=False)
    server, _ = parse_args([])
    assert (server.port, server.max_concurrent_rpcs) == (DEFAULT_PORT, MAX_CONCURRENT_RPCS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        server.port = 1
    assert dataclasses.replace(server, port=0).port == 0


@dataclasses.dataclass(frozen=True)
class _Demo:
    model_repo: str = flags.flag("models", "model repository directory")
    model_version: int | None = flags.flag(0, "version; 0 = the highest",
                                           convert=flags.none_if_zero)
    fallback: bool = flags.flag(False, "answer degraded")
    delay_ms: float = flags.flag(2.0, "delay")


def test_one_declaration_gives_flag_env_twin_and_config(monkeypatch):
    for name in ("CROSSREC_MODEL_REPO", "CROSSREC_MODEL_VERSION", "CROSSREC_FALLBACK",
                 "CROSSREC_DELAY_MS"):
        monkeypatch.delenv(name, raising=False)
    (config,) = flags.parse([], _Demo)
    assert config == _Demo() == _Demo("models", None, False, 2.0)
    (config,) = flags.parse(["--model-repo", "m", "--model-version", "3", "--fallback",
                             "--delay-ms", "0.5"], _Demo)
    assert config == _Demo("m", 3, True, 0.5)
    monkeypatch.setenv("CROSSREC_MODEL_REPO", "/models")
    monkeypatch.setenv("CROSSREC_FALLBACK", "yes")
    monkeypatch.setenv("CROSSREC_DELAY_MS", "7")
    (config,) = flags.parse([], _Demo)
    assert config == _Demo("/models", None, True, 7.0)
    (config,) = flags.parse(["--no-fallback", "--model-repo", "here"], _Demo)
    assert (config.fallback, config.model_repo) == (False, "here")
    assert flags.env_name("--model-repo") == "CROSSREC_MODEL_REPO"
