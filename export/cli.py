"""What every export main() shares: the --model-repo flag (env twin CROSSREC_MODEL_REPO) and
--dataset, the log format, and the BLAS thread cap."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dataio import AMAZON

LOG_FORMAT = "%(asctime)s %(name)s %(message)s"


def default_model_repo() -> str:
    """$CROSSREC_MODEL_REPO, else models (relative to the working directory)."""
    return os.environ.get("CROSSREC_MODEL_REPO", "models")


def parser(description: str, dataset: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser with --model-repo and, when `dataset`, --dataset (default AMAZON)."""
    out = argparse.ArgumentParser(description=description)
    out.add_argument("--model-repo", default=default_model_repo(),
                     help="model repository root (default models); env CROSSREC_MODEL_REPO")
    if dataset:
        out.add_argument("--dataset", default=AMAZON)
    return out


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)


def limit_blas_threads(n: int = 1) -> None:
    """Small matmuls (200 candidates x 384) run many times slower with several OpenBLAS
    threads on a busy machine; ONNX Runtime keeps its own thread pool."""
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n, user_api="blas")
    except ImportError:
        pass
