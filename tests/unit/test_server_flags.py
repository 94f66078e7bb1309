"""Common server flags: --threads (handler threads per process) still answers to its old
name --workers and to the old env twin, and the ranking service's --processes defaults to the
cores this process may use."""

from __future__ import annotations

import argparse
import os

from services.common.serve import add_server_flags


def parse(argv, env: dict[str, str], monkeypatch) -> argparse.Namespace:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_server_flags(parser, 50053)
    return parser.parse_args(argv)


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
    args, _ = parse_args([])
    assert args.processes == len(os.sched_getaffinity(0))
    monkeypatch.setenv("CROSSREC_PROCESSES", "3")
    args, _ = parse_args([])
    assert args.processes == 3
