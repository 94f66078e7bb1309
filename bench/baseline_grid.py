"""The baselines' hyper-parameters for a dataset, chosen on its validation targets only
(protocol A warm, NDCG@10): ALS (factors, regularization, alpha) and item-kNN's damping
exponent. export/systems.py keeps the chosen values per dataset; this is how they were chosen.

    .venv/bin/python -m bench.baseline_grid --dataset movielens-1m --model-repo models-movielens-1m
        (bench/results/baseline-grid-<dataset>.json)
"""

from __future__ import annotations

import itertools
import json
import sys
import time

from bench.common import RESULTS, machine, write_results
from dataio import dataset_name
from export import cli
from export.cases import build_cases, default_data, validation_users
from export.evaluate import evaluate_system
from export.systems import ALSSystem, ItemKNNSystem

ALS_GRID = {"factors": (16, 32, 64, 128, 256), "regularization": (1.0, 30.0, 300.0),
            "alpha": (1.0, 10.0, 40.0), "iterations": (15,)}
DAMPING_GRID = (0.0, 0.5, 0.7, 1.0, 1.5)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=None, help="first N validation users")
    args = parser.parse_args(argv)
    cli.setup_logging()
    cli.limit_blas_threads()
    data = default_data(args.model_repo, args.dataset)
    users = validation_users(data)[:args.users] if args.users else validation_users(data)
    cases = build_cases("A", "warm", users, data, "val")
    out = {"command": " ".join(["python -m bench.baseline_grid"] + sys.argv[1:]),
           **machine(), "dataset": dataset_name(args.dataset),
           "cases": len(cases), "setting": "A warm, validation targets", "als": [],
           "itemknn": []}
    for values in itertools.product(*ALS_GRID.values()):
        params = dict(zip(ALS_GRID, values))
        t = time.monotonic()
        m = evaluate_system(ALSSystem(data, params), cases, data)["pooled"]
        out["als"].append({"params": params, "ndcg@10": m["ndcg@10"], "hr@10": m["hr@10"],
                           "s": round(time.monotonic() - t, 1)})
        print(out["als"][-1], flush=True)
    for damping in DAMPING_GRID:
        m = evaluate_system(ItemKNNSystem(data, damping), cases, data)["pooled"]
        out["itemknn"].append({"damping": damping, "ndcg@10": m["ndcg@10"], "hr@10": m["hr@10"]})
        print(out["itemknn"][-1], flush=True)
    out["best"] = {"als": max(out["als"], key=lambda r: r["ndcg@10"]),
                   "itemknn": max(out["itemknn"], key=lambda r: r["ndcg@10"])}
    write_results(RESULTS / f"baseline-grid-{dataset_name(args.dataset)}.json", out)
    print(json.dumps(out["best"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
