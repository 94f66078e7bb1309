"""The embedding engine on CUDA: parity with the torch reference and a throughput run.

Skipped (with the reason) where ONNX Runtime offers no CUDA provider, as in CI; run with
`make test-gpu` on a machine set up with `make setup GPU=1`.
"""

import json
import os
import time

import numpy as np
import onnxruntime as ort
import pytest

from recmodel.modelrepo import read_meta
from recmodel.ortsession import CUDA
from recmodel.encoder import Encoder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUDA not in ort.get_available_providers(),
                       reason=f"ONNX Runtime has no CUDA provider here "
                              f"({ort.get_available_providers()}); install with GPU=1"),
]


@pytest.fixture(scope="module")
def cuda_engine(encoder_dir):
    engine = Encoder(encoder_dir, device="cuda")
    assert engine.provider == CUDA
    engine.warmup()
    return engine


def test_cuda_vectors_match_the_torch_reference(cuda_engine, encoder_dir, titles):
    from export.encoder_reference import torch_reference
    served = cuda_engine.run_sorted(cuda_engine.tokenize(titles), 32)
    reference = torch_reference(read_meta(encoder_dir)["source_model"]["path"])(titles)
    assert np.abs(served - reference).max() <= 1e-4
    assert ((served * reference).sum(1)).min() >= 0.9999


def test_cuda_throughput_on_real_titles(cuda_engine, capsys):
    from dataio import sample_titles
    texts = sample_titles(4096, seed=5)
    encoded = cuda_engine.tokenize(texts)
    figures = {}
    for batch in (32, 128, 512):
        cuda_engine.run_sorted(encoded[:batch], batch)
        started = time.perf_counter()
        cuda_engine.run_sorted(encoded, batch)
        figures[batch] = round(len(texts) / (time.perf_counter() - started), 1)
    print("cuda titles/s by batch size:", json.dumps(figures))
    out = os.environ.get("CROSSREC_GPU_RESULTS")
    if out:
        with open(out, "w") as f:
            json.dump({"provider": cuda_engine.provider, "titles_per_s": figures}, f)
    assert all(v > 0 for v in figures.values())
