"""The compute floor under a served Recommend: the CPU time per query of the pipeline alone,
in this process, with no gRPC, no store and no explanation, on real validation cases of the
real catalogue, with serving's thread settings (one BLAS thread, the user tower's and the
ranker's served ONNX sessions). A served Recommend can cost no less than this; bench/e2e.py
runs it in its own run, beside the served CPU per Recommend by process.

    .venv/bin/python -m bench.pipeline_floor [--cases 200]   (bench/results/pipeline_floor.json)

Stages (export/systems.py's CrossrecSystem runs the same calls):
- `user_tower`: fusion's model call for one profile (services/fusion/model.encode_user through
  export.rank_data.user_context: the windows the ranker reads, one ONNX call);
- `candidates`: ranking's retrieval (the pca scan, its shortlist re-scored exactly) and the
  co-visit sums and merge (services/ranking/pipeline.candidates);
- `features`: pipeline.features over the candidates;
- `ranker`: the ranker's ONNX call and the final order.
`ranking` = candidates + features + ranker (what the ranking process computes per Recommend
besides gRPC, the profile call and explanations); `fusion_model` = user_tower.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from bench.common import MODEL_REPO, RESULTS, machine, write_results
from export import rank_data as rk
from export.cases import build_cases, default_data, validation_users
from export.systems import rank_fn
from recmodel import pipeline

STAGES = ("user_tower", "candidates", "features", "ranker")


def validation_cases(data, setting: str, n: int) -> list:
    """The first n protocol-A cases of the validation users (tests/e2e's choice)."""
    cases = []
    for user in validation_users(data):
        cases += build_cases("A", setting, [user], data)
        if len(cases) >= n:
            break
    return cases[:n]


def measure(repo: str, n_cases: int = 200, repeats: int = 2) -> dict:
    """CPU ms per query of each stage (the last of `repeats` passes: the first warms caches),
    over n_cases warm and n_cases cold-platform cases."""
    data = default_data(repo)
    system = rank_fn("crossrec", repo, data)
    data = system.data
    cases = validation_cases(data, "warm", n_cases) + validation_cases(data, "cold", n_cases)
    ranker, covisit = system.ranker, system.ranker.covisit
    spent = dict.fromkeys(STAGES, 0.0)
    with threadpool_limits(1, user_api="blas"):
        for _ in range(repeats):
            spent = dict.fromkeys(STAGES, 0.0)
            for case in cases:
                t0 = time.process_time()
                ctx = rk.user_context(system.model, data, case.query)
                t1 = time.process_time()
                table = data.tables[case.platform]
                cands = pipeline.candidates(ctx, table, covisit, ranker.candidates,
                                            ranker.covisit_candidates)
                t2 = time.process_time()
                feats = pipeline.features(ctx, table, cands, covisit)
                t3 = time.process_time()
                np.argsort(-ranker.score(feats), kind="stable")
                t4 = time.process_time()
                for stage, took in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    spent[stage] += took
    per_query = {s: round(1000 * v / len(cases), 3) for s, v in spent.items()}
    per_query["ranking"] = round(per_query["candidates"] + per_query["features"]
                                 + per_query["ranker"], 3)
    per_query["fusion_model"] = per_query["user_tower"]
    return {"cases": len(cases), "candidates": ranker.candidates,
            "index": data.tables[cases[0].platform].snapshot.kind,
            "cpu_ms_per_query": per_query}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=200, help="warm and cold cases each")
    p.add_argument("--model-repo", default=MODEL_REPO)
    p.add_argument("--out", default=str(RESULTS / "pipeline_floor.json"))
    args = p.parse_args(argv)
    results = {**machine(), **measure(args.model_repo, args.cases)}
    print(results["cpu_ms_per_query"])
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
