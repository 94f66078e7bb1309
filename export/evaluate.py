"""Offline evaluation: full-catalogue ranking quality of crossrec and baselines on the user
tower's validation (and, where the split has them, test) targets, written to
bench/results/eval.{json,png} for the Amazon data and eval-<dataset>.{json,png} for any other.

    python -m export.evaluate --model-repo models [--users N] [--dataset movielens-1m]

Protocol A (ours): leave-last-out per platform. For each validation user and platform P the
target is the user's last event on P (all rows, history and held-out targets, in seq_index
order), the input every earlier event on both platforms; warm = that input, cold = the input
without any event on P. The target is ranked against P's whole catalogue (no sampled negatives).
Protocol B (URLLM, arXiv 2406.03085, Table 3): input = the user's merged role=history rows,
target = each role=heldout_target row, ranked against its platform's whole catalogue, one row
pooled over both platforms. Our copy withholds the source's test users, so protocol B here is
on our validation users, not on their test split.
Data without its own held-out targets (MovieLens-1M) is split leave-one-out by time
(export/user_data.py SPLIT_RULES): each user's last event is the test target, the one before it
the validation target, input = every earlier event; protocol A on those sequences is exactly
that protocol (one platform: no cold setting). The test figures ("A_warm_test") are the ones
to report; the validation ones ("A_warm") are what anything is chosen on.

A system is a callable(user_events, platform) -> ranked item ids (TOP_K), user_events being
BehaviorEvent fields (dataio.to_event) oldest first; in-process systems
(export/systems.py) also offer rank_cases(cases) -> (top lists, full ranks) for batched
evaluation and exact MRR. To evaluate another system (e.g. Recommend over running services) on
the same users and metrics:

    from export.cases import build_cases, validation_users
    cases = build_cases("A", "cold", validation_users()[:200])
    metrics = evaluate_system(my_rank, cases)
"""

from __future__ import annotations

import json
import logging
import os
import platform as _platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dataio import AMAZON, dataset_name
from export import cli
from export import user_data as ud
from export.candidates import CANDIDATES
from export.cases import Case, build_cases, default_data, held_out_users, validation_users
from export.eval_report import (ANCHORS, METRICS_DOC, PROTOCOLS, PUBLISHED, plot, systems_doc,
                                table, targets_report)
from export.metrics import K, hit_rate, intra_list_diversity, mrr, ndcg, novelty, ranks_from_lists
from export.rank_data import RankData, load_user_model
from export.ranker import MODEL_NAME as RANKER
from export.systems import (INT8_ENCODER, SYSTEMS, TOP_K, ALSSystem, CrossrecSystem,
                            ItemKNNSystem, PopularitySystem, TextSimilaritySystem,
                            UserVectorSystem, int8_item_vectors, load_ranker)
from recmodel.modelrepo import versions
from recmodel.user_model import SERVED_THREADS, BaselineUserModel

log = logging.getLogger("export.evaluate")

SETTINGS = (("A", "warm"), ("A", "cold"), ("B", "warm"))
RESULTS_DIR = Path("bench/results")
INT8_NOTE = ("int8 item vectors for catalogue and history alike; the same user tower and ranker "
             "(trained on fp32 vectors)")


# ---------------------------------------------------------------------------- metrics

def evaluate_system(rank, cases: list[Case], data: RankData | None = None) -> dict:
    """{"pooled" | platform: metrics} of a system on `cases`.

    `rank`: callable(user_events, platform) -> ranked item ids (the first TOP_K are used; MRR
    then counts a target below them as 0), or an object with rank_cases(cases) -> (top lists,
    full 1-based ranks) for exact MRR. Metrics: hr@10, ndcg@10, recall@20 (= HR@20, one
    target), mrr, coverage@10, novelty@10, ild@10 (item text vectors), n.
    """
    data = data or default_data()
    if hasattr(rank, "rank_cases"):
        tops, ranks = rank.rank_cases(cases)
        ranks = np.asarray(ranks, float)
    else:
        tops = [[str(i) for i in list(rank(c.events, c.platform))[:TOP_K]] for c in cases]
        ranks = ranks_from_lists(tops, [c.target for c in cases])
    totals = {p: data.counts[rows].sum() for p, rows in data.catalogue.items()}
    sizes = {p: len(rows) for p, rows in data.catalogue.items()}

    def share_fn(platform):
        # Add-one smoothing: an item no training user touched still has a finite novelty.
        def share(item_id):
            row = data.row_of.get((platform, item_id))
            count = data.counts[row] if row is not None else 0.0
            return (count + 1.0) / (totals[platform] + sizes[platform])
        return share

    def group(sel: list[int]) -> dict:
        r = ranks[sel]
        out = {"hr@10": hit_rate(r, 10), "ndcg@10": ndcg(r, 10), "recall@20": hit_rate(r, 20),
               "mrr": mrr(r), "n": len(sel)}
        by_platform = {}
        for i in sel:
            by_platform.setdefault(cases[i].platform, []).append(i)
        items = {(cases[i].platform, x) for i in sel for x in tops[i][:K]}
        out["coverage@10"] = len(items) / sum(sizes[p] for p in by_platform)
        out["novelty@10"] = float(np.mean([novelty([tops[i]], share_fn(cases[i].platform))
                                           for i in sel]))
        vecs = [data.vecs[[data.row_of[(cases[i].platform, x)] for x in tops[i][:K]
                           if (cases[i].platform, x) in data.row_of]] for i in sel]
        out["ild@10"] = intra_list_diversity(vecs)
        return out

    result = {"pooled": group(list(range(len(cases))))}
    for p in sorted({c.platform for c in cases}):
        result[p] = group([i for i, c in enumerate(cases) if c.platform == p])
    return result



# ---------------------------------------------------------------------------- systems

def load_models(repo: str, allow_baseline: bool = False) -> tuple:
    """(user tower as served, the ranker or None, eval.json's "models" record)."""
    tower = load_user_model(repo, allow_baseline=allow_baseline, intra_op_threads=SERVED_THREADS)
    models = {"user_tower": {"name": tower.name, "version": tower.version}}
    if not versions(repo, RANKER):
        return tower, None, models
    ranker = load_ranker(repo)
    trained_on = ranker.meta.get("user_tower", {}).get("version")
    models["ranker"] = {"version": ranker.meta["version"], "candidates": ranker.candidates,
                        "covisit_candidates": ranker.covisit_candidates,
                        "user_tower": ranker.meta.get("user_tower")}
    if trained_on != tower.version:
        log.warning("ranker v%s was trained on user_tower v%s, evaluating with v%s",
                    ranker.meta["version"], trained_on, tower.version)
    return tower, ranker, models


def builders(data: RankData, tower, ranker, seed: int) -> dict:
    """{system name: () -> system} of every system but crossrec_int8 (int8_builder)."""
    out = {
        "crossrec": lambda: CrossrecSystem(data, tower, ranker, "crossrec"),
        "crossrec_retrieval_only": lambda: UserVectorSystem(data, tower,
                                                            "crossrec_retrieval_only"),
        "fusion_untrained": lambda: UserVectorSystem(data, BaselineUserModel(),
                                                     "fusion_untrained"),
        "popularity": lambda: PopularitySystem(data),
        "text_similarity": lambda: TextSimilaritySystem(data),
        "als": lambda: ALSSystem(data, seed=seed),
        "itemknn": lambda: ItemKNNSystem(data),
    }
    if ranker is None:
        out.pop("crossrec")
    return out


def int8_builder(data: RankData, tower, ranker, repo: str, dataset: str) -> tuple:
    """(eval.json's "int8" note, () -> crossrec on the int8 encoder's item vectors), or
    (None, None) without an int8 encoder."""
    t = time.monotonic()
    found = int8_item_vectors(dataset, repo, build=True)
    if found is None:
        return None, None
    int8_data = data.with_vectors(found[1], {"name": INT8_ENCODER, "version": found[2]})
    cos = np.einsum("nd,nd->n", data.vecs, found[1] /
                    np.linalg.norm(found[1], axis=1, keepdims=True))
    note = {"encoder": int8_data.encoder, "load_or_build_s": round(time.monotonic() - t, 1),
            "item_vector_cosine_vs_fp32": {"mean": float(cos.mean()), "min": float(cos.min()),
                                           "p01": float(np.quantile(cos, 0.01))},
            "note": INT8_NOTE}
    return note, lambda: CrossrecSystem(int8_data, tower, ranker, "crossrec_int8")


def evaluate_all(systems: dict, cases: dict[str, list[Case]], data: RankData) -> tuple:
    """(results {system: {setting: metrics}}, timings_s) of every system on every case set."""
    results, timings = {}, {}
    # The bar counts (system, setting) runs; log lines print above it.
    with logging_redirect_tqdm(), tqdm(total=len(systems) * len(cases), desc="evaluation",
                                       unit="run", disable=None) as bar:
        for name, build in systems.items():
            bar.set_postfix_str(name)
            t = time.monotonic()
            system = build()
            results[name], timings[name] = {}, {"build_s": round(time.monotonic() - t, 1)}
            for key, cs in cases.items():
                t = time.monotonic()
                results[name][key] = evaluate_system(system, cs, data)
                timings[name][key] = round(time.monotonic() - t, 1)
                m = results[name][key]["pooled"]
                log.info("%-24s %-7s HR@10 %.4f NDCG@10 %.4f R@20 %.4f MRR %.4f "
                         "(%d cases, %.0fs)", name, key, m["hr@10"], m["ndcg@10"],
                         m["recall@20"], m["mrr"], m["n"], timings[name][key])
                bar.update()
    return results, timings


# ---------------------------------------------------------------------------- report

def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _label(protocol: str, setting: str, part: str = "val") -> str:
    return f"{protocol}_{setting}" + ("" if part == "val" else f"_{part}")


def case_sets(data: RankData, users: int | None = None) -> dict[str, list[Case]]:
    """{label: cases} of every setting the data has (cold: more than one platform; B: data
    with its own held-out targets) on the validation users and, where the split has them, the
    test users (the first `users` of each when given)."""
    settings = [(p, s) for p, s in SETTINGS
                if (s != "cold" or len(data.catalogue) > 1)
                and (p != "B" or data.split.rule == ud.SPLIT_USERS)]
    out = {}
    for part, ids in (("val", validation_users(data)), ("test", held_out_users(data, "test"))):
        ids = ids[:users] if users else ids
        for p, s in settings if ids else ():
            out[_label(p, s, part)] = build_cases(p, s, ids, data, part)
    return out


def run(repo: str, users: int | None, out_dir: Path, systems: tuple[str, ...] = SYSTEMS,
        dataset: str = AMAZON, seed: int = 0, allow_baseline: bool = False) -> dict:
    t0 = time.monotonic()
    data = default_data(repo, dataset)
    cases = case_sets(data, users)
    val_users = {c.user_id for k, cs in cases.items() if not k.endswith("_test") for c in cs}
    test_n = len({c.user_id for k, cs in cases.items() if k.endswith("_test") for c in cs})
    log.info("%d validation users, %d test users (split %s); cases: %s; data ready in %.0fs",
             len(val_users), test_n, data.split.rule, {k: len(v) for k, v in cases.items()},
             time.monotonic() - t0)
    tower, ranker, models = load_models(repo, allow_baseline)
    n_cands, n_cov = (CANDIDATES, 0) if ranker is None else (ranker.candidates,
                                                              ranker.covisit_candidates)
    available = builders(data, tower, ranker, seed)
    int8_note = None
    if "crossrec_int8" in systems and ranker is not None:
        int8_note, build = int8_builder(data, tower, ranker, repo, dataset)
        if build is not None:
            available["crossrec_int8"] = build
    if ranker is None:
        log.warning("no ranker in %s: crossrec systems skipped", repo)
    results, timings = evaluate_all({n: available[n] for n in systems if n in available},
                                    cases, data)
    targets = targets_report(results, dataset)
    report = {
        "command": " ".join(["python -m export.evaluate"] + sys.argv[1:]),
        "git_sha": _git_sha(), "cpus": os.cpu_count(), "python": _platform.python_version(),
        "dataset": dataset_name(dataset), "seed": seed, "top_k": TOP_K, "candidates": n_cands,
        "split": {"rule": data.split.rule, "doc": ud.SPLIT_RULES[data.split.rule]},
        "validation_users": len(val_users), "test_users": test_n,
        "cases": {k: len(v) for k, v in cases.items()},
        "models": models, "item_encoder": data.encoder, "int8": int8_note,
        "protocols": PROTOCOLS, "metrics": METRICS_DOC,
        "systems": systems_doc(n_cands, n_cov, dataset),
        "published": ({k: {"hr@10": v[0], "ndcg@10": v[1]} for k, v in PUBLISHED.items()}
                      if dataset_name(dataset) == AMAZON else
                      ANCHORS.get(dataset_name(dataset), {})),
        "targets": targets, "results": results, "timings_s": timings,
        "total_s": round(time.monotonic() - t0, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "eval" if dataset_name(dataset) == AMAZON else f"eval-{dataset_name(dataset)}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out_dir / f"{stem}.png", dataset)
    log.info("results:\n%s", table(results))
    log.info("targets: %s", json.dumps(targets, indent=1))
    log.info("wrote %s and %s.png (total %.0fs)", out_dir / f"{stem}.json", stem,
             report["total_s"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=None,
                        help="evaluate the first N validation users (default: all)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-baseline", action="store_true",
                        help="stand the untrained baseline in for a missing user tower "
                             "(development only)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    cli.limit_blas_threads()
    run(args.model_repo, args.users, Path(args.out_dir), tuple(args.systems.split(",")),
        args.dataset, args.seed, args.allow_baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
