"""User tower: trains the cross-platform user model on Amazon Arts/Office and exports it to ONNX.

A user's most recent MAX_EVENTS events on every platform (item text vectors, platform, action,
weight, recency) become one L2-normalised user vector in the item-text space, as seen by a
target platform; dot(user_vec, item_vec) ranks that platform's items, also when the user has no
history there (cross-platform transfer).

    python -m export.user_tower --model-repo models [--epochs N] [--seed 0]

ONNX contract (models/user_tower/<N>/model.onnx; B and L are dynamic, L <= MAX_EVENTS trained):
  inputs  item_vecs       float32 [B, L, D]  L2-normalised item text vectors (the encoder named
                                             in meta.json), oldest event first, newest last,
                                             left-padded (padding rows: zeros)
          platform_ids    int64   [B, L]     meta.json platform_vocab id, 0 = a platform the
                                             model was not trained on (and padding)
          action_ids      int64   [B, L]     crossrec.common.v1.Action value (padding: 0)
          weights         float32 [B, L]     BehaviorEvent.weight, else the action's default
                                             (recmodel/pooling.py); > 0 (padding: 0)
          ages            float32 [B, L]     rank from the newest event of the window: the
                                             newest real event 0, the one before 1, ...
                                             (padding: 0)
          mask            float32 [B, L]     1 = real event, 0 = padding; >= 1 real event per row
          target_platform int64   [B]        platform_vocab id of the platform to rank for
                                             (0 = unknown platform)
  outputs user_vec        float32 [B, D]     L2-normalised
          event_weights   float32 [B, L]     attention over events (0 on padding, sums to 1)
A row with no real event yields an arbitrary unit vector and all-zero event_weights: callers
must not feed one. The model attends causally (an event sees itself and older events of its
row), so the order of the row matters; training and serving agree exactly while a user's
events fit in the window (tests/unit/test_user_tower.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dataio import AMAZON, dataset_name
from export import cli, metrics, publish
from export import user_data as ud
from export.user_tower_model import INPUT_NAMES, N_ACTIONS, OUTPUT_NAMES, TrainConfig, UserTower
from export.user_tower_training import evaluate, train, window_tensors
from recmodel.ortsession import ort_session
from recmodel.pooling import (ACTION_INTERACT, ACTION_NAMES, DEFAULT_ACTION_WEIGHT,
                                     HALF_LIFE_EVENTS)

log = logging.getLogger("export.user_tower")

MODEL_NAME = "user_tower"
PARITY_TOLERANCE = 1e-4
IO = publish.OnnxIO(INPUT_NAMES, OUTPUT_NAMES, {
    **{n: {0: "batch", 1: "events"} for n in INPUT_NAMES if n != "target_platform"},
    "target_platform": {0: "batch"}, "user_vec": {0: "batch"},
    "event_weights": {0: "batch", 1: "events"}})

# meta.json's descriptions (recmodel/user_model.py lists which keys serving reads).
FEATURES_DOC = {
    "order": "oldest event first, newest last; rows left-padded (padding at the start)",
    "window": f"the user's most recent max_events ({ud.MAX_EVENTS}) events over every "
              "platform, after any filtering (e.g. the target platform removed)",
    "item_vecs": "item text vector of the event's item from the named encoder "
                 "(compose_item_text(title, attributes)); zeros on padding",
    "platform_ids": "platform_vocab[platform], 0 when the platform is not in it",
    "action_ids": "crossrec.common.v1.Action enum value",
    "weights": "BehaviorEvent.weight when set (ACTION_RATE: rating 1..5), else "
               "default_action_weight[action]; must be > 0 on real events; the model "
               "multiplies an event's attention by it",
    "ages": "rank from the newest real event of the row, in events: newest 0, then 1, "
            "2, ...; the model reads log1p(ages)",
    "mask": "1.0 real event, 0.0 padding; every row needs at least one real event",
    "target_platform": "platform_vocab id of the platform the vector ranks for; 0 "
                       "for a platform not in the vocabulary",
}
BASELINE_DOC = {"name": "time_decayed_mean",
                "formula": "L2norm(sum_i weights_i * 0.5 ** (ages_i / half_life) * item_vec_i)",
                "half_life_events": HALF_LIFE_EVENTS,
                "implementation": "recmodel.pooling.baseline_user_vec"}
SCORE_DOC = ("dot(user_vec, item_vec); temperature is the training softmax temperature "
             "(dot / temperature is a logit)")
PRIOR_SCORE_DOC = ("dot(user_vec, item_vec) / temperature + log1p(count), count from "
                   "item_popularity.npz (events among training users; 0 if absent)")
EVALUATION_DOC = ("each validation user's heldout_target rows, each ranked among its "
                  "platform's whole catalogue given the user's history rows (last "
                  "max_events); hidden: the target platform's events removed from the input")


# ---------------------------------------------------------------------------- data

@dataclass
class TowerData:
    """The catalogue's item vectors, the user split and the validation windows."""
    ids: list[tuple[str, str]]         # catalogue rows: (platform, item_id)
    item_vecs: np.ndarray              # float32 [n_items, dim]
    encoder: dict                      # {"name", "version", "source_model"} of the item vectors
    vocab: dict[str, int]              # platform vocabulary
    train_seqs: list[ud.UserSeq]
    val_seqs: list[ud.UserSeq]
    catalogue: dict[int, np.ndarray]   # platform id -> catalogue rows
    val: dict[str, ud.Windows]         # "visible" | "hidden" -> validation windows
    split_rule: str = ud.SPLIT_USERS   # the key of ud.SPLIT_RULES


def load_data(repo: str | os.PathLike, dataset: str, encoder_version: int | None = None,
              item_data=None) -> TowerData:
    """Item vectors (export.item_vectors, unless `item_data` = (ids, vecs, encoder) is given),
    the sequences, export.user_data's split and the validation windows."""
    from export.item_vectors import ENCODER_NAME, encoder_ref, item_vectors

    t0 = time.monotonic()
    if item_data is None:
        _, enc_version, enc_meta = encoder_ref(repo, encoder_version)
        ids, item_vecs = item_vectors(dataset, repo, enc_version)
        encoder = {"name": ENCODER_NAME, "version": enc_version,
                   "source_model": enc_meta.get("source_model", {}).get("name_or_path")}
    else:
        ids, item_vecs, encoder = item_data
    users, missing = ud.load_sequences(dataset, ids)
    split = ud.split_sequences(users)
    val_seqs = split.val
    windows = {"visible": ud.heldout_windows(val_seqs, False),
               "hidden": ud.heldout_windows(val_seqs, True)}
    # One platform: no target platform can be hidden from its user.
    data = TowerData(ids, item_vecs, encoder, split.vocab, split.train, val_seqs,
                     ud.catalogue_rows(ids, split.vocab),
                     {k: w for k, w in windows.items() if len(w)}, split.rule)
    log.info("%d users (%d train, %d validation), %d events dropped (item not in catalogue); "
             "validation queries: %s; data ready in %.0fs", len(users), len(data.train_seqs),
             len(val_seqs), missing, {k: len(w) for k, w in data.val.items()},
             time.monotonic() - t0)
    return data


def baselines(data: TowerData) -> dict:
    """{baseline: {setting: metrics}} of the untrained user vectors and of popularity."""
    vecs, val, cat = data.item_vecs, data.val, data.catalogue
    pop = ud.popularity(data.train_seqs, cat, len(data.ids))
    return {
        "time_decayed_mean": evaluate(lambda w: ud.baseline_vectors(w, vecs), val, vecs, cat),
        "time_decayed_mean_same_platform": evaluate(
            lambda w: ud.same_platform_baseline_vectors(w, vecs), val, vecs, cat),
        "popularity": {name: metrics.metrics_from_ranks(metrics.rank_by_score(pop, w, cat))
                       for name, w in val.items()},
    }


def parity_feeds(data: TowerData) -> list[dict]:
    """Both validation window sets whole, and 64 visible windows cut to their last 7 events."""
    feeds = [window_tensors(w, data.item_vecs) for w in data.val.values()]
    short = window_tensors(data.val["visible"], data.item_vecs, slice(0, 64))
    cut = {k: (v[:, -7:] if v.ndim > 1 else v) for k, v in short.items()}
    cut["mask"] = cut["mask"].copy()
    cut["mask"][:, -1] = 1.0  # every row keeps at least one real event after the cut
    return feeds + [cut]


def _table(rows: dict) -> str:
    settings = [k for k in ("visible", "hidden") if any(k in m for m in rows.values())]
    lines = [f"{'':28s}" + "".join(f" {k + ' R@10':>12s} {'N@10':>8s}" for k in settings)]
    for name, m in rows.items():
        lines.append(f"{name:28s}" + "".join(
            f" {m[k]['recall@10']:12.4f} {m[k]['ndcg@10']:8.4f}" for k in settings))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- export

def ort_run(path: Path, feeds: dict, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(user_vec, event_weights) of the ONNX file `path` on `feeds`, `batch` rows a call."""
    sess = ort_session(path, 2, spinning=True)
    n = len(feeds["mask"])
    outs = [sess.run(list(OUTPUT_NAMES),
                     {k: np.ascontiguousarray(v[b0:b0 + batch]) for k, v in feeds.items()})
            for b0 in range(0, n, batch)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def check_parity(model: UserTower, path: Path, feeds: list[dict]) -> dict:
    """Max abs diff of onnxruntime vs torch on every feed set; raises if over tolerance."""
    model.eval()
    worst = publish.parity_gate(model, lambda f: ort_run(path, f), feeds, IO, PARITY_TOLERANCE)
    result = {"max_abs_diff": max(worst.values()), "by_output": worst,
              "n_windows": sum(len(f["mask"]) for f in feeds), "tolerance": PARITY_TOLERANCE,
              "shapes": sorted({tuple(f["mask"].shape) for f in feeds})}
    log.info("parity: max abs diff %.2e over %d windows (tolerance %g)",
             result["max_abs_diff"], result["n_windows"], PARITY_TOLERANCE)
    return result


def untrained_actions_like_interact(model: UserTower, trained_actions: set[int]) -> list[int]:
    """Copy ACTION_INTERACT's embedding into action rows training never saw, so an unseen
    action is treated as an interaction (its weight still differs): returns the rows tied."""
    tied = [a for a in range(1, N_ACTIONS) if a not in trained_actions]
    with torch.no_grad():
        for a in tied:
            model.action_emb.weight[a] = model.action_emb.weight[ACTION_INTERACT]
    return tied


def write_version(repo: str | os.PathLike, model: UserTower, meta: dict,
                  parity_feeds: list[dict], eval_fn=None,
                  arrays: dict[str, dict[str, np.ndarray]] | None = None) -> tuple[Path, dict]:
    """Export (traced on parity_feeds[0]), gate on parity, optionally evaluate the ONNX file
    (eval_fn(onnx path, meta) -> meta), write models/user_tower/<N>/ (model.onnx, `arrays` as
    .npz files, meta.json). Nothing is written unless parity holds."""
    def finish(tmp: Path, staged: dict) -> dict:
        if eval_fn is not None:
            staged = eval_fn(tmp / publish.MODEL_FILE, staged)
        for name, content in (arrays or {}).items():
            np.savez(tmp / name, **content)
        return staged

    model.eval()
    sample = tuple(torch.from_numpy(np.ascontiguousarray(parity_feeds[0][n])) for n in INPUT_NAMES)
    return publish.publish_onnx(repo, MODEL_NAME, model, sample, IO,
                                lambda path: check_parity(model, path, parity_feeds), meta, finish)


def onnx_metrics(onnx_path: Path, data: TowerData, temperature: float) -> tuple[dict, dict]:
    """({setting: metrics} of the exported file's user vectors, the same ranked by
    dot / temperature + log1p(item count among training users))."""
    log_pop = np.log1p(ud.item_counts(data.train_seqs, len(data.ids)))
    plain, blended = {}, {}
    for name, w in data.val.items():
        user_vec, _ = ort_run(onnx_path, window_tensors(w, data.item_vecs))
        plain[name] = metrics.metrics_from_ranks(
            metrics.rank_of_targets(user_vec, w, data.item_vecs, data.catalogue))
        blended[name] = metrics.metrics_from_ranks(metrics.rank_of_targets(
            user_vec, w, data.item_vecs, data.catalogue, item_bias=log_pop,
            scale=1.0 / temperature))
    return plain, blended


# ---------------------------------------------------------------------------- main

def tower_meta(cfg: TrainConfig, data: TowerData, dataset: str, temperature: float,
               trained_actions: set[int], tied: list[int], training: dict) -> dict:
    """meta.json of a trained tower, but name, version, parity and metrics (added on export)."""
    dim = int(data.item_vecs.shape[1])
    events = {"dtype": "float32", "shape": ["batch", "events"]}
    ids = {"dtype": "int64", "shape": ["batch", "events"]}
    return {
        "format": "onnx", "opset": publish.OPSET, "model_file": publish.MODEL_FILE,
        "input_names": list(INPUT_NAMES), "output_names": list(OUTPUT_NAMES),
        "inputs": {"item_vecs": {"dtype": "float32", "shape": ["batch", "events", dim]},
                   "platform_ids": ids, "action_ids": ids, "weights": events, "ages": events,
                   "mask": events, "target_platform": {"dtype": "int64", "shape": ["batch"]}},
        "outputs": {"user_vec": {"dtype": "float32", "shape": ["batch", dim], "normalized": True},
                    "event_weights": events},
        "dim": dim, "max_events": ud.MAX_EVENTS,
        "score": PRIOR_SCORE_DOC if cfg.popularity_prior else SCORE_DOC,
        "temperature": temperature,
        "platform_vocab": data.vocab, "unknown_platform_id": 0,
        "action_vocab": {name: i for i, name in enumerate(ACTION_NAMES)},
        "actions_seen_in_training": sorted(trained_actions),
        "actions_tied_to_interact": tied, "features": FEATURES_DOC,
        "default_action_weight": {ACTION_NAMES[a]: w for a, w in DEFAULT_ACTION_WEIGHT.items()},
        "baseline": BASELINE_DOC, "encoder": data.encoder, "dataset": dataset_name(dataset),
        "split": {"rule": data.split_rule, "doc": ud.SPLIT_RULES[data.split_rule],
                  "val_fraction": ud.VAL_FRACTION, "split_seed": ud.SPLIT_SEED,
                  "train_users": len(data.train_seqs), "val_users": len(data.val_seqs)},
        "evaluation": EVALUATION_DOC,
        "seed": cfg.seed, "train_config": asdict(cfg), "training": training,
        "created_at": publish.created_at(), "exporter": publish.torch_exporter(),
    }


def popularity_arrays(data: TowerData) -> dict[str, dict[str, np.ndarray]]:
    """item_popularity.npz of a prior-trained tower: the training users' count of each item."""
    counts = ud.item_counts(data.train_seqs, len(data.ids))
    return {"item_popularity.npz": {
        "platforms": np.array([p for p, _ in data.ids]),
        "item_ids": np.array([i for _, i in data.ids]), "counts": counts.astype(np.int64)}}


def run(cfg: TrainConfig, repo: str | os.PathLike, dataset: str = AMAZON,
        encoder_version: int | None = None, item_data=None) -> tuple[Path, dict]:
    """Load data, train, evaluate model and baselines, export models/user_tower/<N>/."""
    t0 = time.monotonic()
    data = load_data(repo, dataset, encoder_version, item_data)
    results = baselines(data)
    log.info("baselines:\n%s", _table(results))

    model, history, info = train(cfg, data.train_seqs, data.vocab, data.item_vecs,
                                 data.catalogue, data.val)
    trained_actions = {int(a) for s in data.train_seqs for a in np.unique(s.actions)}
    tied = untrained_actions_like_interact(model, trained_actions)
    feeds = parity_feeds(data)
    temperature = float(model.log_temperature.detach().exp().clamp(min=0.01))

    def eval_onnx(onnx_path: Path, meta: dict) -> dict:
        plain, blended = onnx_metrics(onnx_path, data, temperature)
        rows = {"user_tower (onnx)": plain, **results, "user_tower/tau + log1p(count)": blended}
        log.info("validation (%d users, full ranking over the target platform's catalogue):\n%s",
                 len(data.val_seqs), _table(rows))
        meta["metrics"] = {"user_tower": plain, **results,
                           "user_tower_plus_log_popularity": blended}
        meta["metrics"]["ndcg@10_ratio_vs_best_baseline"] = {
            s: plain[s]["ndcg@10"] / max(results[b][s]["ndcg@10"] for b in results)
            for s in data.val}
        return meta

    meta = tower_meta(cfg, data, dataset, temperature, trained_actions, tied,
                      {**info, "history": history})
    arrays = popularity_arrays(data) if cfg.popularity_prior else None
    path, meta = write_version(repo, model, meta, feeds, eval_onnx, arrays)
    log.info("wrote %s (total %.0fs)", path, time.monotonic() - t0)
    return path, meta


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--encoder-version", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-train-s", type=float, default=TrainConfig.max_train_s,
                        help="stop after the epoch that crosses this many seconds")
    parser.add_argument("--no-self-attention", action="store_true")
    parser.add_argument("--popularity-prior", action="store_true",
                        help="train dot/temperature + log1p(item count) (see TrainConfig)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed, max_train_s=args.max_train_s,
                      self_attention=not args.no_self_attention,
                      popularity_prior=args.popularity_prior)
    run(cfg, args.model_repo, args.dataset, args.encoder_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
