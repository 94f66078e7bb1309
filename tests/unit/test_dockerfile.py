"""The serving images, offline (no Docker engine here): docker/Dockerfile's runtime stages copy
exactly the rooms the servers import, none of the tools, export, data readers, benchmarks or
tests; .dockerignore lets in what the Dockerfile copies and nothing of those; the builder
installs the serving dependencies read from pyproject.toml."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
SERVING_ROOMS = {"services", "recmodel", "clients"}
NOT_SERVING = {"tools", "export", "dataio", "bench", "tests"}
RUNTIME_STAGES = ("runtime", "embedding-gpu")


def stages() -> dict[str, list[str]]:
    """{stage name: its instructions}, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = found.setdefault(match.group(1), [])
        current.append(line)
    return found


def context_copies(instructions: list[str]) -> list[str]:
    """Sources of the COPY lines that read the main build context (not --from)."""
    sources = []
    for line in instructions:
        words = line.split()
        if words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def first_party_imports(room: str) -> set[str]:
    """Top-level first-party packages imported anywhere in `room` (function-level too)."""
    rooms = SERVING_ROOMS | NOT_SERVING
    found = set()
    for path in (REPO / room).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {name.split(".")[0] for name in names} & rooms
    return found


def test_the_runtime_images_copy_the_serving_rooms_and_no_tools():
    for stage in RUNTIME_STAGES:
        copied = {Path(src).parts[0] for src in context_copies(stages()[stage])}
        assert copied == SERVING_ROOMS, (stage, copied)


def test_the_serving_rooms_import_only_what_the_images_carry():
    for room in sorted(SERVING_ROOMS):
        assert first_party_imports(room) <= SERVING_ROOMS, room


def test_the_builders_take_the_dependencies_not_the_code():
    for stage in ("builder", "builder-gpu"):
        copied = {Path(src).parts[0] for src in context_copies(stages()[stage])}
        assert copied == {"pyproject.toml", "docker", "protos"}, (stage, copied)


def test_the_build_context_lets_in_what_the_dockerfile_copies_and_nothing_else():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # everything out, then let back in
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {src.rstrip("/") for instructions in stages().values()
              for src in context_copies(instructions)} - {"."}
    assert copied <= allowed, copied - allowed
    assert not {Path(a).parts[0] for a in allowed} & NOT_SERVING


def test_the_image_requirements_are_pyprojects_serving_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    run = subprocess.run([sys.executable, str(REPO / "docker" / "requirements.py"), "cpu"],
                         capture_output=True, text=True, check=True)
    printed = run.stdout.split()
    assert printed == project["dependencies"] + project["optional-dependencies"]["cpu"]
    assert not any(re.match(r"(torch|transformers|onnx)\b(?!runtime)", r) for r in printed)
    wrong = subprocess.run([sys.executable, str(REPO / "docker" / "requirements.py"), "cpux"],
                           capture_output=True, text=True)
    assert wrong.returncode != 0 and "unknown extra 'cpux'" in wrong.stderr
