"""The import contracts in pyproject.toml (lint-imports, run by `make lint`): the house keeps
them, and a wrong arrow breaks them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOMS = ("tools", "services", "export", "clients", "dataio", "recmodel", "bench")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(),
                                reason="lint-imports is not installed (make setup installs it)")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{REPO / 'gen'}"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_of_the_house(tmp_path: Path) -> Path:
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    for room in ROOMS:
        shutil.copytree(REPO / room, tmp_path / room,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    return tmp_path


def test_the_house_keeps_its_import_contracts():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("source, wrong_import, broken", [
    ("services/ranking/engine.py", "from export import metrics",
     "services is not allowed to import export"),
    ("recmodel/pipeline.py", "from services.common import errors",
     "recmodel is not allowed to import services"),
    ("clients/crossrec_client/channels.py", "from services.common import errors",
     "clients.crossrec_client.channels -> services.common.errors"),
    ("services/fusion/engine.py", "from tools import stack",
     "services is not allowed to import tools"),
    ("recmodel/features.py", "import torch", "recmodel.features -> torch"),
    ("export/metrics.py", "from bench import common", "export is not allowed to import bench"),
])
def test_a_wrong_arrow_breaks_the_contracts_naming_it(tmp_path, source, wrong_import, broken):
    root = copy_of_the_house(tmp_path)
    with open(root / source, "a") as f:
        f.write(f"\n{wrong_import}  # noqa: E402,F401\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout
