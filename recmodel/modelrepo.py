"""Integer-versioned model repository: models/<name>/<N>/{model.onnx, meta.json, ...}.

Versions are never overwritten: a new version is written into a temporary directory beside
the final one and renamed into place, so a reader sees either nothing or a complete version.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def versions(repo: str | os.PathLike, name: str) -> list[int]:
    """Complete versions of `name` (directories with a meta.json), ascending."""
    root = Path(repo) / name
    if not root.is_dir():
        return []
    found = [int(p.name) for p in root.iterdir()
             if p.name.isdigit() and (p / "meta.json").is_file()]
    return sorted(found)


def resolve(repo: str | os.PathLike, name: str, version: int | None = None) -> Path:
    """Directory of `name` at `version` (None: the highest). FileNotFoundError if absent."""
    found = versions(repo, name)
    if not found:
        raise FileNotFoundError(f"no version of model '{name}' in {Path(repo).resolve()}; "
                                f"run `make models` to export it")
    if version is None:
        version = found[-1]
    if version not in found:
        raise FileNotFoundError(f"model '{name}' has no version {version} in {repo}; "
                                f"available: {found}")
    return Path(repo) / name / str(version)


def read_meta(model_dir: str | os.PathLike) -> dict:
    return json.loads((Path(model_dir) / "meta.json").read_text())


def read_served_meta(model_dir: str | os.PathLike, served: tuple[str, ...],
                     export_command: str) -> dict:
    """meta.json of a model serving loads; ValueError naming the keys of `served` it lacks
    (an export older than the serving code) and the command that exports a new version."""
    meta = read_meta(model_dir)
    missing = [k for k in served if k not in meta]
    if missing:
        raise ValueError(f"{model_dir} meta.json lacks {missing}; export a new version: "
                         f"{export_command}")
    return meta


@contextlib.contextmanager
def new_version(repo: str | os.PathLike, name: str):
    """Yield (temp_dir, version) to write a new version into; renamed into place on success.

    The caller writes every file, meta.json last. On an exception the temp dir is removed and
    no version appears. If another writer took the same number meanwhile, the rename fails
    rather than overwrite it.
    """
    root = Path(repo) / name
    root.mkdir(parents=True, exist_ok=True)
    existing = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    version = max(existing, default=0) + 1
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=root))
    try:
        yield tmp, version
        tmp.chmod(0o755)  # mkdtemp makes 0700; servers may run as another (non-root) user
        final = root / str(version)
        os.rename(tmp, final)  # fails with OSError if `final` exists and is non-empty
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_meta(model_dir: str | os.PathLike, meta: dict) -> None:
    (Path(model_dir) / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
