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
from export.metrics import K, hit_rate, intra_list_diversity, mrr, ndcg, novelty, ranks_from_lists
from export.rank_data import RankData, load_user_model
from export.ranker import MODEL_NAME as RANKER
from export.systems import (ALS_PARAMS, BASELINES, DATASET_ALS_PARAMS, DATASET_ITEMKNN_DAMPING,
                            ITEMKNN_DAMPING, INT8_ENCODER, SYSTEMS, TOP_K, ALSSystem,
                            CrossrecSystem, ItemKNNSystem, PopularitySystem,
                            TextSimilaritySystem, UserVectorSystem, int8_item_vectors,
                            load_ranker)
from recmodel.modelrepo import versions
from recmodel.user_model import SERVED_THREADS, BaselineUserModel

log = logging.getLogger("export.evaluate")

SETTINGS = (("A", "warm"), ("A", "cold"), ("B", "warm"))
# arXiv 2406.03085 Table 3, Amazon Arts/Office, (HR@10, NDCG@10) on their test users.
PUBLISHED = {"C2DSR": (0.0320, 0.0234), "UniSRec": (0.0375, 0.0242),
             "GPT4Rec": (0.0435, 0.0287), "URLLM": (0.0485, 0.0371)}
# MovieLens-1M, leave-one-out by time, full ranking: SASRec-style models' HR@10 in the
# literature, and gSASRec's reproduced Recall@10 (Petrov & Macdonald, RecSys 2023).
ANCHORS = {"movielens-1m": {"sasrec_style_hr@10_band": (0.22, 0.31),
                            "gsasrec_recall@10": 0.3134}}
RESULTS_DIR = Path("bench/results")
# eval.json's descriptions of what it measured.
PROTOCOLS = {
    "A": "leave-last-out per platform over all rows (seq_index order); input = every "
         "earlier event on both platforms (warm) or without the target platform's "
         "events (cold); full ranking over the target platform's catalogue",
    "B": "URLLM (arXiv 2406.03085 Table 3): input = role=history rows, target = each "
         "role=heldout_target row, full ranking over its platform's catalogue, pooled",
}
METRICS_DOC = {"hr@10": "target in top 10", "ndcg@10": "1/log2(rank+1) if rank <= 10",
               "recall@20": "HR@20 (one target)", "mrr": "1/full rank (exact)",
               "coverage@10": "distinct top-10 items over cases / catalogue size",
               "novelty@10": "mean -log2((count+1)/(total+catalogue)) of top-10 items, "
                             "training-user counts of the platform",
               "ild@10": "mean pairwise 1 - cosine of item text vectors in a top-10",
               "ties": "broken by catalogue order (deterministic)"}
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


PANEL_TITLES = {"A_warm": "Protocol A, warm", "A_cold": "Protocol A, cold platform",
                "B_warm": "Protocol B (URLLM targets), our val users"}


def _title(key: str) -> str:
    base = key.removesuffix("_test")
    title = PANEL_TITLES.get(base, base)
    return title + (", test targets" if key.endswith("_test") else
                    (", validation targets" if base != "B_warm" else ""))


def plot(results: dict, path: Path, dataset: str = AMAZON) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in SYSTEMS if s in results]
    keys = list(results[systems[0]])
    panels = [(k, _title(k)) for k in keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.7 * len(panels), 5.2), squeeze=False)
    axes = axes[0]
    anchors = ANCHORS.get(dataset_name(dataset))
    x = np.arange(len(systems))
    for ax, (key, title) in zip(axes, panels):
        ndcg_v = [results[s].get(key, {}).get("pooled", {}).get("ndcg@10", 0) for s in systems]
        hr_v = [results[s].get(key, {}).get("pooled", {}).get("hr@10", 0) for s in systems]
        ax.bar(x - 0.2, ndcg_v, 0.4, label="NDCG@10")
        ax.bar(x + 0.2, hr_v, 0.4, label="HR@10")
        if key == "B_warm":
            hr_u, ndcg_u = PUBLISHED["URLLM"]
            ax.axhline(ndcg_u, color="C0", ls="--", lw=1, label=f"URLLM NDCG@10 {ndcg_u}")
            ax.axhline(hr_u, color="C1", ls="--", lw=1, label=f"URLLM HR@10 {hr_u}")
        if anchors and key.startswith("A_warm"):
            lo, hi = anchors["sasrec_style_hr@10_band"]
            ax.axhspan(lo, hi, color="C1", alpha=0.12, label=f"SASRec-style HR@10 {lo}-{hi}")
        ax.set_xticks(x, systems, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    counts = [results[systems[0]].get(k, {}).get("pooled", {}).get("n") for k, _ in panels]
    platforms = sorted({g for r in results.values() for m in r.values() for g in m} - {"pooled"})
    fig.suptitle(f"{dataset_name(dataset)}: full-catalogue ranking, pooled over "
                 f"{' + '.join(platforms)} (n per panel: {counts})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(results: dict) -> str:
    lines = []
    for key in dict.fromkeys(k for r in results.values() for k in r):
        groups = sorted({g for r in results.values() for g in r.get(key, {})},
                        key=lambda g: (g != "pooled", g))
        for g in groups:
            lines.append(f"[{key} / {g}]")
            lines.append(f"  {'system':26s} {'HR@10':>7s} {'NDCG@10':>8s} {'R@20':>7s} "
                         f"{'MRR':>7s} {'cov@10':>7s} {'nov@10':>7s} {'ILD@10':>7s} {'n':>5s}")
            for s, r in results.items():
                m = r.get(key, {}).get(g)
                if m:
                    lines.append(f"  {s:26s} {m['hr@10']:7.4f} {m['ndcg@10']:8.4f} "
                                 f"{m['recall@20']:7.4f} {m['mrr']:7.4f} {m['coverage@10']:7.4f} "
                                 f"{m['novelty@10']:7.2f} {m['ild@10']:7.4f} {m['n']:5d}")
    return "\n".join(lines)


def targets_report(results: dict, dataset: str = AMAZON) -> dict:
    def n(system, key):
        return results.get(system, {}).get(key, {}).get("pooled", {}).get("ndcg@10")

    out = {}
    anchors = ANCHORS.get(dataset_name(dataset))
    test = results.get("crossrec", {}).get("A_warm_test", {}).get("pooled")
    if anchors and test:
        lo, hi = anchors["sasrec_style_hr@10_band"]
        out["test_vs_published_band"] = {
            "ours": {k: test[k] for k in ("hr@10", "ndcg@10", "mrr", "n")},
            "sasrec_style_hr@10_band": [lo, hi],
            "gsasrec_recall@10": anchors["gsasrec_recall@10"],
            "position": ("above" if test["hr@10"] > hi else
                         "within" if test["hr@10"] >= lo else "below"),
            "caveat": "published figures are other papers' runs of the same protocol "
                      "(leave-one-out by time, full ranking), not reproduced here"}
    if n("crossrec", "A_warm") is not None:
        best = max((b for b in BASELINES if n(b, "A_warm") is not None),
                   key=lambda b: n(b, "A_warm"))
        ratio = n("crossrec", "A_warm") / max(n(best, "A_warm"), 1e-12)
        out["warm_vs_best_baseline"] = {"target": ">= 1.3x", "best_baseline": best,
                                        "ratio": ratio, "met": ratio >= 1.3}
    if n("crossrec", "A_cold") is not None and n("popularity", "A_cold") is not None:
        ratio = n("crossrec", "A_cold") / max(n("popularity", "A_cold"), 1e-12)
        best = max((b for b in BASELINES if n(b, "A_cold") is not None),
                   key=lambda b: n(b, "A_cold"))
        out["cold_vs_popularity"] = {"target": ">= 2x", "ratio": ratio, "met": ratio >= 2.0,
                                     "best_baseline": best, "ratio_vs_best_baseline":
                                     n("crossrec", "A_cold") / max(n(best, "A_cold"), 1e-12)}
    b = results.get("crossrec", {}).get("B_warm", {}).get("pooled")
    if b:
        hr_u, ndcg_u = PUBLISHED["URLLM"]
        out["protocol_b_vs_urllm"] = {
            "ours": {"hr@10": b["hr@10"], "ndcg@10": b["ndcg@10"], "n": b["n"]},
            "urllm": {"hr@10": hr_u, "ndcg@10": ndcg_u},
            "hr_ratio": b["hr@10"] / hr_u, "ndcg_ratio": b["ndcg@10"] / ndcg_u,
            "caveat": "ours: our validation users (URLLM's train/valid users re-split); "
                      "theirs: their withheld test users; same data, item set and protocol"}
    return out



def systems_doc(n_cands: int, n_cov: int, dataset: str = AMAZON) -> dict:
    """eval.json's description of each system."""
    als = DATASET_ALS_PARAMS.get(dataset_name(dataset), ALS_PARAMS)
    damping = DATASET_ITEMKNN_DAMPING.get(dataset_name(dataset), ITEMKNN_DAMPING)
    return {
        "crossrec": f"recmodel.pipeline.rank, as served: user tower -> {n_cands} "
                    "candidates (the best by exact dot product, the last up to "
                    f"{n_cov} replaced by the user's best co-visit items) -> ranker; "
                    "every other item after them by dot product",
        "crossrec_retrieval_only": "user tower for_platform vector, dot over catalogue",
        "fusion_untrained": "recmodel.user_model.BaselineUserModel (time-decayed mean "
                            "pooling of the last 50 events; ignores the target platform)",
        "popularity": "training users' event counts per item of the target platform",
        "text_similarity": "mean of all input events' item text vectors (no training)",
        "als": f"implicit {_implicit_version()} ALS {als} on training users' "
               "(user, item) events; validation queries folded in by the exact ALS user "
               "step (recalculate_user) from their input events only; params: best of a "
               "small grid on the validation targets (A warm NDCG@10; "
               "bench/baseline_grid.py), i.e. flattered",
        "itemknn": "item-based CF: summed co-visit counts (training users who had both "
                   "items) with the query's distinct input items / (item's users + 1) ** "
                   f"{damping}; damping best of a grid on the validation targets (flattered)",
        "crossrec_int8": "crossrec with item vectors from the int8 encoder",
    }


def _implicit_version() -> str:
    try:
        import implicit
        return implicit.__version__
    except ImportError:
        return "(not installed)"


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
    log.info("results:\n%s", _table(results))
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
