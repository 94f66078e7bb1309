"""The encoder's offline ceiling: the serving engine's own throughput on texts tokenised
beforehand, one thread per core, the most any plumbing around it (batcher, gRPC, the CLI) can
reach; bench/embedding.py and bench/catalogue_load.py measure against it in the same run."""

from __future__ import annotations

import time
from pathlib import Path


def engine_ceiling(model_dir: Path, texts: list[str], seconds: float,
                   group: int | None = None) -> dict:
    """The serving engine's throughput on `texts` for at least `seconds`: Encoder.run_sorted
    over all of them (length-sorted model calls of up to 32 texts: what a perfect batcher of
    the same engine could serve), or, with `group`, over consecutive groups of that many texts
    in their (random) order, each group sorted and cut into calls of one padded length: the
    most a batcher can do when only `group` texts are ever waiting (64 single-title callers:
    64). {"texts_per_s", "cpu_s_per_1000_texts", "tokens_per_text"}."""
    from recmodel.encoder import Encoder

    engine = Encoder(model_dir, device="cpu")
    encoded = engine.tokenize(texts)
    engine.run_sorted(encoded[:64], 32)
    size = group or len(encoded)
    n, cpu0, start = 0, time.process_time(), time.perf_counter()
    while n == 0 or time.perf_counter() - start < seconds:
        for at in range(0, len(encoded), size):
            engine.run_sorted(encoded[at:at + size], 32 if group is None else group)
        n += len(encoded)
    wall = time.perf_counter() - start
    return {"texts_per_s": round(n / wall, 1),
            "cpu_s_per_1000_texts": round((time.process_time() - cpu0) / n * 1000, 3),
            "tokens_per_text": round(sum(len(e.ids) for e in encoded) / len(encoded), 1)}
