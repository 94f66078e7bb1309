"""Prints what a serving image installs, one requirement a line: pyproject.toml's
[project] dependencies plus the extras named as arguments (`cpu` or `gpu`).

The image builder installs these, not the package itself: the servers run from the sources
copied into /app (services/, recmodel/, clients/), so the venv holds no second copy of the
code, and none of the package's other rooms (tools/, export/) that serving never runs.

    python docker/requirements.py cpu > requirements.txt && pip install -r requirements.txt
"""

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra {unknown[0]!r}; pyproject.toml has {sorted(optional)}")
    return list(project["dependencies"]) + [r for e in extras for r in optional[e]]


if __name__ == "__main__":
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    print("\n".join(requirements(pyproject, sys.argv[1:])))
