"""Ranker: trains the candidate re-ranker on Amazon Arts/Office and exports it to ONNX.

Candidates, features and scores come from recmodel/pipeline.py, the code serving runs:
per (user, target platform) query, the platform's top CANDIDATES items by dot(for_platform user
vector, item vector), the last COVISIT_CANDIDATES replaced by co-visit items, scored by the
ranker from candidate_features and re-ordered. Training examples come from training users
only (export.user_data's seeded user split, the user tower's): next-item positions on each
platform, half of them with the target platform's events removed from the input (cold
platform); listwise softmax cross-entropy over the candidates of the examples whose target
was retrieved.

    python -m export.ranker --model-repo models [--seed 0]

ONNX contract (models/ranker/<N>/model.onnx; B and N dynamic):
  input  features float32 [B, N, F]  raw candidate_features rows (F = len(FEATURES)), candidates
                                     in retrieval order; standardisation is inside the model
  output scores   float32 [B, N]     higher is better; a candidate's score does not depend on
                                     the other candidates (no cross-candidate terms)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dataio import AMAZON, dataset_name
from export import cli, metrics, publish
from export import user_data as ud
from export.candidates import CANDIDATES, COVISIT_CANDIDATES, query_features
from export.metrics import ndcg_of_positions
from export.rank_data import (RankData, last_on_platform_queries, load_data, load_user_model,
                              local_row)
from export.ranker_training import TrainConfig, build_examples, train_ranker
from recmodel.ortsession import ort_session
from recmodel.covisit import COVISIT_FILE, CoVisits
from recmodel.features import FEATURES, N_FEATURES

log = logging.getLogger("export.ranker")

MODEL_NAME = "ranker"
RETRIEVAL_FILE = "retrieval.npz"
INPUT_NAME, OUTPUT_NAME = "features", "scores"
PARITY_TOLERANCE = 1e-4
IO = publish.OnnxIO((INPUT_NAME,), (OUTPUT_NAME,),
                    {INPUT_NAME: {0: "batch", 1: "candidates"},
                     OUTPUT_NAME: {0: "batch", 1: "candidates"}})
# meta.json's descriptions (recmodel/ranker.py lists which keys serving reads).
CANDIDATE_RULE = ("recmodel.pipeline.candidates: the target platform's best "
                  "`candidates` items by dot(for_platform user vector, item vector) "
                  "(ties by catalogue row), up to covisit_candidates of the last "
                  "replaced by co-visit items of the user's newest history_events "
                  "events; retrieval_pct = position in that list / candidates")
FEATURE_FUNCTION = ("recmodel.pipeline.features (raw, unscaled: standardisation is "
                    "inside the model)")
POPULARITY_DOC = ("item event counts of the training users (served: fusion's); each training "
                  "example's own user is left out of them")
HISTORY_WINDOW_DOC = "the user tower's max_events newest input events, newest first"


# ---------------------------------------------------------------------------- export

def ort_scores(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """scores float32 [B, N] of features float32 [B, N, F]."""
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(
        x[b0:b0 + batch], dtype=np.float32)})[0] for b0 in range(0, len(x), batch)])


def check_parity(model, path: Path, feature_sets: list[np.ndarray]) -> dict:
    """Max abs diff of onnxruntime vs torch scores; raises over PARITY_TOLERANCE."""
    session = ort_session(path, 2)
    worst = publish.parity_gate(model, lambda f: (ort_scores(session, f[INPUT_NAME]),),
                                [{INPUT_NAME: x} for x in feature_sets], IO, PARITY_TOLERANCE)
    result = {"max_abs_diff": worst[OUTPUT_NAME], "tolerance": PARITY_TOLERANCE,
              "n_lists": sum(len(x) for x in feature_sets),
              "shapes": sorted({tuple(x.shape) for x in feature_sets})}
    log.info("parity: max abs diff %.2e over %d lists (tolerance %g)",
             result["max_abs_diff"], result["n_lists"], PARITY_TOLERANCE)
    return result


def io_meta(n_candidates: int = CANDIDATES, covisit: int = 0, history_events: int = 50
            ) -> dict:
    return {
        "format": "onnx", "opset": publish.OPSET, "model_file": publish.MODEL_FILE,
        "input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME],
        "inputs": {INPUT_NAME: {"dtype": "float32",
                                "shape": ["batch", "candidates", N_FEATURES]}},
        "outputs": {OUTPUT_NAME: {"dtype": "float32", "shape": ["batch", "candidates"]}},
        "features": list(FEATURES), "n_features": N_FEATURES, "candidates": n_candidates,
        "covisit_candidates": covisit, "covisit_file": COVISIT_FILE,
        "retrieval_file": RETRIEVAL_FILE,
        "history_events": history_events,
        "candidate_rule": CANDIDATE_RULE,
        "feature_function": FEATURE_FUNCTION,
        "score": "higher is better; sort candidates by score descending",
    }


def write_version(repo: str | os.PathLike, model, meta: dict, parity_sets: list[np.ndarray],
                  projection: np.ndarray, eval_fn=None, covisit: CoVisits | None = None,
                  history_events: int = 50) -> tuple[Path, dict]:
    """Export, gate on parity, write models/ranker/<N>/ (model.onnx, covisit.npz,
    retrieval.npz, meta.json last). Nothing is written unless parity holds."""
    import torch

    cfg = meta.get("train_config", {})
    meta = dict(meta, **io_meta(cfg.get("candidates", CANDIDATES),
                                cfg.get("covisit_candidates", 0), history_events))

    def finish(tmp: Path, staged: dict) -> dict:
        if covisit is not None:
            covisit.save(tmp / COVISIT_FILE)
        np.savez(tmp / RETRIEVAL_FILE, projection=projection)
        if eval_fn is not None:
            staged = eval_fn(tmp / publish.MODEL_FILE, staged)
        return staged

    return publish.publish_onnx(repo, MODEL_NAME, model, (torch.zeros(2, 7, N_FEATURES),), IO,
                                lambda path: check_parity(model, path, parity_sets), meta, finish)


# ---------------------------------------------------------------------------- validation

def validation_metrics(session, model, data: RankData, n: int = CANDIDATES,
                       covisit: int = COVISIT_CANDIDATES) -> dict:
    """Protocol A (last event per platform, full catalogue) on the validation users:
    retrieval order vs re-ranked, warm and cold platform."""
    out = {}
    for setting, cold in (("warm", False), ("cold", True)):
        queries = [q for s in data.split.val for q in last_on_platform_queries(data, s, cold)]
        if not queries:  # one platform: no user is cold on it
            continue
        feats, cands, ranks = query_features(model, data, queries, n, covisit)
        targets = np.array([local_row(data, q) for q in queries])
        reranked = metrics.rerank_ranks(ort_scores(session, feats), ranks, cands, targets)
        out[setting] = {
            "retrieval": metrics.metrics_from_ranks(ranks),
            "reranked": metrics.metrics_from_ranks(reranked),
            "candidate_recall": float((ranks <= n).mean()), "candidates": n,
            "covisit_candidates": covisit,
        }
        log.info("validation %s (%d queries): retrieval NDCG@10 %.4f -> re-ranked %.4f "
                 "(HR@10 %.4f -> %.4f), candidate recall@%d %.3f", setting, len(queries),
                 out[setting]["retrieval"]["ndcg@10"], out[setting]["reranked"]["ndcg@10"],
                 out[setting]["retrieval"]["recall@10"], out[setting]["reranked"]["recall@10"],
                 n, out[setting]["candidate_recall"])
    return out


# ---------------------------------------------------------------------------- main

def split_training_users(data: RankData, cfg: TrainConfig, rng: np.random.Generator
                         ) -> tuple[list[ud.UserSeq], list[ud.UserSeq], list[ud.UserSeq]]:
    """(training users, fit users, dev users): a seeded dev_fraction of the training users is
    kept for early stopping. Their sequences are the split's training ones: no validation or
    test target is in them (export.user_data.SPLIT_RULES)."""
    train = data.split.train
    dev_n = round(cfg.dev_fraction * len(train))
    order = rng.permutation(len(train))
    return (train, [train[i] for i in sorted(order[dev_n:])],
            [train[i] for i in sorted(order[:dev_n])])


def parity_sets(model, data: RankData, cfg: TrainConfig, x_dev: np.ndarray) -> list[np.ndarray]:
    """Feature sets the ONNX file must match torch on: the first 64 validation users' protocol
    A queries, 5 of them cut to 37 candidates, and 64 dev examples."""
    queries = [q for s in data.split.val[:64] for q in last_on_platform_queries(data, s, False)]
    pf, _, _ = query_features(model, data, queries, cfg.candidates, cfg.covisit_candidates)
    return [pf, pf[:5, :37], x_dev[:64]]


def ranker_meta(cfg: TrainConfig, data: RankData, model, dataset: str, users: tuple,
                examples: dict, training: dict, n_params: int) -> dict:
    """meta.json of a trained ranker, but its io_meta, name, version, parity and validation
    (added on export). `users`: split_training_users' (train, fit, dev)."""
    train, fit, dev = users
    return {
        "dataset": dataset_name(dataset),
        "user_tower": {"name": model.name, "version": model.version,
                       "baseline": bool(model.baseline)},
        "encoder": data.encoder,
        "popularity": POPULARITY_DOC,
        "covisit": f"{COVISIT_FILE}: pairs of items the same training user had (user-level, "
                   f"repeats once), {len(data.covisit)} items, "
                   f"{len(data.covisit.indices)} non-zeros; each training example's own user "
                   "is left out of them",
        "split": {"rule": data.split.rule, "doc": ud.SPLIT_RULES[data.split.rule],
                  "train_users": len(train), "val_users": len(data.split.val),
                  "fit_users": len(fit), "dev_users": len(dev),
                  "dev_rule": f"seeded {cfg.dev_fraction} of training users (early stopping)"},
        "examples": examples,
        "seed": cfg.seed, "train_config": asdict(cfg), "n_params": n_params,
        "training": training,
        "history_window": HISTORY_WINDOW_DOC,
        "created_at": publish.created_at(),
        "exporter": publish.torch_exporter(),
    }


def run(cfg: TrainConfig, repo: str | os.PathLike, dataset: str = AMAZON,
        user_tower_version: int | None = None, allow_baseline: bool = False):
    t0 = time.monotonic()
    data = load_data(repo, dataset)
    model = load_user_model(repo, user_tower_version, allow_baseline)
    if not model.baseline and model.meta.get("split", {}).get("val_users") not in (
            None, len(data.split.val)):
        raise RuntimeError("user split differs from the user tower's: "
                           f"{model.meta['split']} vs {len(data.split.val)} validation users")
    rng = np.random.default_rng(cfg.seed)
    train, fit, dev = users = split_training_users(data, cfg, rng)
    log.info("%d training users (%d fit, %d dev), %d validation targets untouched; user model "
             "%s v%s; data ready in %.0fs", len(train), len(fit), len(dev), len(data.split.val),
             model.name, model.version, time.monotonic() - t0)
    t1 = time.monotonic()
    x, y, stats = build_examples(model, data, fit, cfg, rng, label="fit")
    x_dev, y_dev, dev_stats = build_examples(model, data, dev, cfg, rng, label="dev")
    examples_s = time.monotonic() - t1
    log.info("examples: fit %s, dev %s, %.0fs", x.shape, x_dev.shape, examples_s)
    t2 = time.monotonic()
    ranker, history = train_ranker(x, y, x_dev, y_dev, cfg)
    train_s = time.monotonic() - t2
    n_params = sum(p.numel() for p in ranker.parameters())
    dev_retrieval = ndcg_of_positions(-np.arange(cfg.candidates, dtype=np.float32)[None]
                                      .repeat(len(y_dev), 0), y_dev)

    def eval_fn(onnx_path: Path, meta: dict) -> dict:
        meta["validation"] = validation_metrics(ort_session(onnx_path, 2), model, data,
                                                cfg.candidates, cfg.covisit_candidates)
        return meta

    meta = ranker_meta(cfg, data, model, dataset, users,
                       {"fit": stats, "dev": dev_stats, "build_s": round(examples_s, 1)},
                       {"train_s": round(train_s, 1), "history": history,
                        "best_dev_ndcg@10": max(h["dev_ndcg@10"] for h in history),
                        "dev_retrieval_order_ndcg@10": dev_retrieval[0]}, n_params)
    path, meta = write_version(repo, ranker, meta, parity_sets(model, data, cfg, x_dev),
                               data.projection, eval_fn, data.covisit, model.max_events)
    log.info("wrote %s (%d params, total %.0fs)", path, n_params, time.monotonic() - t0)
    return path, meta


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--user-tower-version", type=int, default=None)
    parser.add_argument("--positions-per-user", type=int, default=TrainConfig.positions_per_user)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--candidates", type=int, default=CANDIDATES,
                        help="candidates re-ranked per query (serving must use the same)")
    parser.add_argument("--covisit-candidates", type=int, default=COVISIT_CANDIDATES,
                        help="of those, up to this many from co-visitation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allow-baseline", action="store_true",
                        help="train on the untrained baseline user model when no user tower "
                             "is exported (development only)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    torch.set_num_threads(args.threads)
    cli.limit_blas_threads()
    cfg = TrainConfig(seed=args.seed, positions_per_user=args.positions_per_user,
                      epochs=args.epochs, candidates=args.candidates,
                      covisit_candidates=args.covisit_candidates)
    run(cfg, args.model_repo, args.dataset, args.user_tower_version, args.allow_baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
