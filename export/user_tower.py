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
                                             (services/fusion/pooling.py); > 0 (padding: 0)
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

import argparse
import datetime as dt
import logging
import math
import os
import platform as _platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from clients.datasets import AMAZON
from export import user_data as ud
from services.common.modelrepo import new_version, write_meta
from services.fusion.pooling import (ACTION_NAMES, DEFAULT_ACTION_WEIGHT, HALF_LIFE_EVENTS,
                                     ACTION_INTERACT)

log = logging.getLogger("export.user_tower")

MODEL_NAME = "user_tower"
INPUT_NAMES = ("item_vecs", "platform_ids", "action_ids", "weights", "ages", "mask",
               "target_platform")
OUTPUT_NAMES = ("user_vec", "event_weights")
OPSET = 17
PARITY_TOLERANCE = 1e-4
N_ACTIONS = len(ACTION_NAMES)
# Longest training sequence per user (most recent events); Amazon users have at most 102.
MAX_TRAIN_SEQ = 128
# A masked logit: large enough to vanish in softmax, small enough to stay finite in fp32.
_NEG = -1e9


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    seed: int = 0
    batch_users: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    d_model: int = 128
    heads: int = 4
    ffn: int = 256
    out_hidden: int = 256
    self_attention: bool = True
    dropout: float = 0.1
    negatives: int = 1024
    init_temperature: float = 0.05
    # Events (and targets) whose platform id is replaced by 0 (unknown), so that id 0 is
    # trained and an unseen platform gets a sensible, platform-agnostic treatment.
    platform_dropout: float = 0.05
    # Train the logits as dot / temperature + log1p(item count among training users), so the
    # vector learns what popularity does not explain; serving must then add the same prior.
    popularity_prior: bool = False
    # A guard, not a budget: 5 epochs take about 3 minutes on 2 idle cores.
    max_train_s: float = 480.0


class UserTower(nn.Module):
    """Event encoder, optional causal self-attention, target-platform attention pooling.

    user = L2norm(sum_i a_i * item_vec_i + delta), where a are the pooling attention weights
    (mean over heads) and delta an MLP of the pooled event states and the target platform;
    delta starts at zero, so the untrained model is an attention-weighted mean of item vectors.
    """

    def __init__(self, dim: int, n_platforms: int, cfg: TrainConfig):
        super().__init__()
        d, self.heads = cfg.d_model, cfg.heads
        self.dk = d // cfg.heads
        self.scale = 1.0 / math.sqrt(self.dk)
        self.dim, self.n_platforms, self.self_attention = dim, n_platforms, cfg.self_attention
        self.item_proj = nn.Linear(dim, d)
        self.platform_emb = nn.Embedding(n_platforms, d)
        self.action_emb = nn.Embedding(N_ACTIONS, d)
        self.in_norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.self_attention:
            self.sa_norm = nn.LayerNorm(d)
            self.sa_qkv = nn.Linear(d, 3 * d)
            self.sa_out = nn.Linear(d, d)
            self.ff_norm = nn.LayerNorm(d)
            self.ff = nn.Sequential(nn.Linear(d, cfg.ffn), nn.GELU(), nn.Dropout(cfg.dropout),
                                    nn.Linear(cfg.ffn, d))
        self.key_norm = nn.LayerNorm(d)
        self.pool_k = nn.Linear(d, d)
        self.pool_v = nn.Linear(d, d)
        self.target_query = nn.Embedding(n_platforms, d)
        self.target_emb = nn.Embedding(n_platforms, d)
        # Recency and platform-match bias per head from [log1p(age), same platform as target].
        self.age_bias = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, cfg.heads))
        self.out = nn.Sequential(nn.Linear(2 * d, cfg.out_hidden), nn.GELU(),
                                 nn.Linear(cfg.out_hidden, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.init_temperature)))

    def encode(self, item_vecs, platform_ids, action_ids, sa_allowed):
        """Event states [N, T, d]; sa_allowed bool [N, T, T]: which events each event sees."""
        e = self.item_proj(item_vecs) + self.platform_emb(platform_ids) + \
            self.action_emb(action_ids)
        h = self.drop(self.in_norm(e))
        if self.self_attention:
            n, t, d = h.shape
            q, k, v = self.sa_qkv(self.sa_norm(h)).reshape(n, t, 3, self.heads,
                                                            self.dk).unbind(2)
            scores = torch.einsum("nqhc,nkhc->nhqk", q * self.scale, k)
            scores = scores.masked_fill(~sa_allowed[:, None], _NEG)
            ctx = torch.einsum("nhqk,nkhc->nqhc", scores.softmax(-1), v).reshape(n, t, d)
            h = h + self.drop(self.sa_out(ctx))
            h = h + self.drop(self.ff(self.ff_norm(h)))
        return h

    def pool(self, h, item_vecs, platform_ids, weights, target, allowed, ages, int_ages=False):
        """User vectors for Q queries per sequence.

        h [N, T, d], item_vecs [N, T, D], platform_ids [N, T], weights [N, T];
        target int64 [N, Q]; allowed bool [N, Q, T]; ages float [N, Q, T].
        int_ages: ages are whole numbers in 0..MAX_TRAIN_SEQ, so the recency MLP is evaluated
        once per distinct value and looked up (same function, far less work in training).
        Returns user float [N, Q, D] (L2-normalised) and attention [N, Q, T].
        """
        n, t, d = h.shape
        hk = self.key_norm(h)
        keys = self.pool_k(hk).reshape(n, t, self.heads, self.dk)
        values = self.pool_v(hk).reshape(n, t, self.heads, self.dk)
        query = self.target_query(target).reshape(n, -1, self.heads, self.dk)
        scores = torch.einsum("nqhc,nthc->nqth", query * self.scale, keys)
        same = ((platform_ids[:, None, :] == target[:, :, None]) &
                (platform_ids[:, None, :] > 0))
        if int_ages:
            grid_age = torch.arange(MAX_TRAIN_SEQ + 1, dtype=h.dtype)
            grid = torch.stack([torch.log1p(grid_age)[:, None].expand(-1, 2),
                                torch.tensor([0.0, 1.0])[None, :].expand(len(grid_age), -1)],
                               dim=-1)
            table = self.age_bias(grid).reshape(-1, self.heads)       # [(age, same), H]
            scores = scores + table[ages.long() * 2 + same.long()]
        else:
            feats = torch.stack([torch.log1p(ages.clamp(min=0.0)), same.to(h.dtype)], dim=-1)
            scores = scores + self.age_bias(feats)
        # Weights are a multiplicative prior on attention (only weight 1 occurs in training).
        scores = scores + torch.log(weights.clamp(min=1e-6))[:, None, :, None]
        scores = scores.masked_fill(~allowed[..., None], _NEG)
        attn = scores.softmax(2)                                      # [N, Q, T, H]
        pooled = torch.einsum("nqth,nthc->nqhc", attn, values).reshape(n, -1, d)
        event_w = attn.mean(-1)                                       # [N, Q, T]
        base = torch.einsum("nqt,ntd->nqd", event_w, item_vecs)
        delta = self.out(torch.cat([pooled, self.target_emb(target)], dim=-1))
        return F.normalize(base + delta, dim=-1, eps=1e-12), event_w

    def forward(self, item_vecs, platform_ids, action_ids, weights, ages, mask, target_platform):
        """The ONNX contract (module docstring): one window per row, newest event last."""
        real = mask > 0.5
        pos = torch.cumsum(torch.ones_like(mask), dim=1)
        earlier_or_self = pos[:, None, :] <= pos[:, :, None]
        sa_allowed = (earlier_or_self & real[:, None, :]) | (pos[:, None, :] == pos[:, :, None])
        h = self.encode(item_vecs, platform_ids, action_ids, sa_allowed)
        user, attn = self.pool(h, item_vecs, platform_ids, weights, target_platform[:, None],
                               real[:, None, :], ages[:, None, :])
        return user[:, 0], attn[:, 0] * mask


# ---------------------------------------------------------------------------- training

@dataclass
class TrainArrays:
    """Training users' sequences, right-padded to a common length T."""
    items: np.ndarray      # int64 [U, T]
    platforms: np.ndarray  # int64 [U, T]
    actions: np.ndarray    # int64 [U, T]
    weights: np.ndarray    # float32 [U, T]
    length: np.ndarray     # int64 [U]
    n_history: np.ndarray  # int64 [U]


def train_arrays(seqs: list[ud.UserSeq]) -> TrainArrays:
    cut = [max(0, len(s.items) - MAX_TRAIN_SEQ) for s in seqs]
    lengths = np.array([len(s.items) - c for s, c in zip(seqs, cut)], dtype=np.int64)
    u, t = len(seqs), int(lengths.max())
    a = TrainArrays(np.zeros((u, t), np.int64), np.zeros((u, t), np.int64),
                    np.zeros((u, t), np.int64), np.zeros((u, t), np.float32), lengths,
                    np.array([s.n_history - c for s, c in zip(seqs, cut)], dtype=np.int64))
    for i, (s, c) in enumerate(zip(seqs, cut)):
        n = lengths[i]
        a.items[i, :n], a.platforms[i, :n] = s.items[c:], s.platforms[c:]
        a.actions[i, :n], a.weights[i, :n] = s.actions[c:], s.weights[c:]
    return a


def batch_views(a: TrainArrays, users: np.ndarray, n_platforms: int, max_events: int):
    """Every next-item example of `users`, visible and hidden, as masks over whole sequences.

    View 0 keeps every platform; view p (1..P-1) drops platform p's events. Query position t
    of a view predicts item t from the events j < min(t, n_history) present in the view (a
    held-out target sees the history only, as in evaluation), the last `max_events` of them.
    View p queries only the positions on platform p: the hidden-target-platform examples, as
    many as the visible ones. Returns torch tensors for UserTower.encode/pool plus the
    (sequence, position) of each valid query.
    """
    t = int(a.length[users].max())
    items = torch.from_numpy(a.items[users, :t])
    plats = torch.from_numpy(a.platforms[users, :t])
    acts = torch.from_numpy(a.actions[users, :t])
    wts = torch.from_numpy(a.weights[users, :t])
    length = torch.from_numpy(a.length[users])
    n_hist = torch.from_numpy(a.n_history[users])
    u, v = len(users), n_platforms
    idx = torch.arange(t)
    real = idx[None, :] < length[:, None]                              # [U, T]
    view = torch.arange(v)
    present = real[None] & ((view[:, None, None] == 0) |
                            (plats[None] != view[:, None, None]))      # [V, U, T]
    limit = torch.minimum(idx[None, :], n_hist[:, None])               # [U, Tq]
    allowed = present[:, :, None, :] & (idx[None, None, None, :] < limit[None, :, :, None])
    later = torch.flip(torch.cumsum(torch.flip(allowed.int(), [-1]), -1), [-1])
    ages = (later - allowed.int()).float()
    allowed = allowed & (ages < max_events)
    query_ok = real[None] & ((view[:, None, None] == 0) | (plats[None] == view[:, None, None]))
    query_ok = query_ok & allowed.any(-1)                              # [V, U, Tq]
    earlier_or_self = idx[None, :] <= idx[:, None]
    sa_allowed = ((earlier_or_self[None, None] & present[:, :, None, :])
                  | torch.eye(t, dtype=torch.bool))
    def flat(x):
        return x.reshape(v * u, *x.shape[2:])
    return {
        "items": items, "plats": plats, "acts": acts, "wts": wts,
        "sa_allowed": flat(sa_allowed), "allowed": flat(allowed), "ages": flat(ages),
        "query": flat(query_ok).nonzero(as_tuple=False),               # [M, 2] (seq, pos)
        "n_views": v,
    }


def training_loss(model: UserTower, b: dict, item_table: torch.Tensor,
                  catalogue: dict[int, torch.Tensor], negatives: int,
                  platform_dropout: float, gen: torch.Generator,
                  log_pop: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Sampled softmax over the target platform's catalogue (uniform negatives, shared by the
    batch's queries of that platform), mean over the batch's queries. log_pop [n_items]: an
    additive logit prior (the positive's own event is left out of its count)."""
    v = b["n_views"]
    plats = b["plats"]
    if model.training and platform_dropout > 0:
        drop = torch.rand(plats.shape, generator=gen) < platform_dropout
        plats_in = plats.masked_fill(drop, 0)
    else:
        plats_in = plats
    x = item_table[b["items"]]                                          # [U, T, D]
    def rep(z):
        return z.repeat(v, *([1] * (z.dim() - 1)))
    xv, pv = rep(x), rep(plats_in)
    h = model.encode(xv, pv, rep(b["acts"]), b["sa_allowed"])
    target_true = rep(plats)                                            # [N, T]
    target_in = target_true
    if model.training and platform_dropout > 0:
        drop_t = torch.rand(target_true.shape, generator=gen) < platform_dropout
        target_in = target_true.masked_fill(drop_t, 0)
    user, _ = model.pool(h, xv, pv, rep(b["wts"]), target_in, b["allowed"], b["ages"],
                         int_ages=True)
    seq, pos = b["query"][:, 0], b["query"][:, 1]
    u = user[seq, pos]                                                  # [M, D]
    tgt_item = rep(b["items"])[seq, pos]
    tgt_plat = target_true[seq, pos]
    u = u / model.log_temperature.exp().clamp(min=0.01)
    losses = []
    for pid, rows in catalogue.items():
        sel = (tgt_plat == pid).nonzero(as_tuple=True)[0]
        if len(sel) == 0:
            continue
        neg = rows[torch.randint(len(rows), (negatives,), generator=gen)]
        us = u[sel]
        pos_logit = (us * item_table[tgt_item[sel]]).sum(-1, keepdim=True)
        neg_logit = us @ item_table[neg].T
        if log_pop is not None:
            counts = torch.expm1(log_pop[tgt_item[sel]])
            pos_logit = pos_logit + torch.log1p((counts - 1).clamp(min=0))[:, None]
            neg_logit = neg_logit + log_pop[neg][None, :]
        neg_logit = neg_logit.masked_fill(neg[None, :] == tgt_item[sel][:, None], _NEG)
        logits = torch.cat([pos_logit, neg_logit], dim=1)
        losses.append(F.cross_entropy(logits, torch.zeros(len(sel), dtype=torch.long),
                                      reduction="sum"))
    return torch.stack(losses).sum() / len(seq), len(seq)


# ---------------------------------------------------------------------------- evaluation

def window_tensors(w: ud.Windows, item_vecs: np.ndarray, rows: slice | np.ndarray = slice(None)):
    """The ONNX feeds (numpy) for queries `rows` of `w`."""
    return {
        "item_vecs": item_vecs[w.items[rows]] * w.mask[rows][..., None],
        "platform_ids": w.platform_ids[rows], "action_ids": w.action_ids[rows],
        "weights": w.weights[rows], "ages": w.ages[rows], "mask": w.mask[rows],
        "target_platform": w.target_platform[rows],
    }


@torch.no_grad()
def model_vectors(model: UserTower, w: ud.Windows, item_vecs: np.ndarray,
                  batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    users, attn = [], []
    for b0 in range(0, len(w), batch):
        feeds = window_tensors(w, item_vecs, slice(b0, b0 + batch))
        out = model(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in INPUT_NAMES))
        users.append(out[0].numpy())
        attn.append(out[1].numpy())
    return np.concatenate(users), np.concatenate(attn)


def evaluate(vectors_fn, val: dict, item_vecs, catalogue, item_bias=None,
             scale: float = 1.0) -> dict:
    """{setting: metrics} for user vectors from vectors_fn(windows) on both settings, ranked
    by scale * dot (+ item_bias when given)."""
    return {name: ud.metrics_from_ranks(ud.rank_of_targets(vectors_fn(w), w, item_vecs,
                                                           catalogue, item_bias, scale))
            for name, w in val.items()}


def _fmt(m: dict) -> str:
    return "  ".join(f"{s}: R@10 {v['recall@10']:.4f} N@10 {v['ndcg@10']:.4f}"
                     for s, v in m.items())


# ---------------------------------------------------------------------------- export

def export_onnx(model: UserTower, path: Path, sample: dict) -> None:
    model.eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample[n])) for n in INPUT_NAMES)
    axes = {n: {0: "batch", 1: "events"} for n in INPUT_NAMES if n != "target_platform"}
    axes["target_platform"] = {0: "batch"}
    axes["user_vec"] = {0: "batch"}
    axes["event_weights"] = {0: "batch", 1: "events"}
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated but is the one this contract
        # was validated with; its warning says nothing about this model.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes=axes, do_constant_folding=True)


def ort_run(path: Path, feeds: dict, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    n = len(feeds["mask"])
    outs = [sess.run(list(OUTPUT_NAMES),
                     {k: np.ascontiguousarray(v[b0:b0 + batch]) for k, v in feeds.items()})
            for b0 in range(0, n, batch)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


@torch.no_grad()
def check_parity(model: UserTower, path: Path, parity_feeds: list[dict]) -> dict:
    """Max abs diff of onnxruntime vs torch on every feed set; raises if over tolerance."""
    model.eval()
    worst = {"user_vec": 0.0, "event_weights": 0.0}
    n = 0
    for feeds in parity_feeds:
        ref = model(*(torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in INPUT_NAMES))
        got = ort_run(path, feeds)
        for name, r, g in zip(OUTPUT_NAMES, ref, got):
            worst[name] = max(worst[name], float(np.abs(r.numpy() - g).max()))
        n += len(feeds["mask"])
    result = {"max_abs_diff": max(worst.values()), "by_output": worst, "n_windows": n,
              "tolerance": PARITY_TOLERANCE,
              "shapes": sorted({tuple(f["mask"].shape) for f in parity_feeds})}
    if not result["max_abs_diff"] <= PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX parity failed: max abs diff {result['max_abs_diff']:.3g} > "
                           f"{PARITY_TOLERANCE:g} ({worst})")
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
    """Export, gate on parity, optionally evaluate the ONNX file, write models/user_tower/<N>/.
    Nothing is written unless parity holds (new_version removes its temp dir on error)."""
    with new_version(repo, MODEL_NAME) as (tmp, version):
        onnx_path = tmp / "model.onnx"
        export_onnx(model, onnx_path, parity_feeds[0])
        parity = check_parity(model, onnx_path, parity_feeds)
        log.info("parity: max abs diff %.2e over %d windows (tolerance %g)",
                 parity["max_abs_diff"], parity["n_windows"], PARITY_TOLERANCE)
        meta = dict(meta, name=MODEL_NAME, version=version, parity=parity)
        if eval_fn is not None:
            meta = eval_fn(onnx_path, meta)
        for name, content in (arrays or {}).items():
            np.savez(tmp / name, **content)
        write_meta(tmp, meta)
    return Path(repo) / MODEL_NAME / str(version), meta


# ---------------------------------------------------------------------------- main

def _seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def train(cfg: TrainConfig, train_seqs: list[ud.UserSeq], vocab: dict[str, int],
          item_vecs: np.ndarray, catalogue: dict[int, np.ndarray], val: dict) -> tuple:
    """Train; returns (best model by mean val NDCG@10 over both settings, history, info)."""
    gen = _seed_all(cfg.seed)
    arrays = train_arrays(train_seqs)
    model = UserTower(item_vecs.shape[1], len(vocab), cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters, self_attention=%s", n_params, cfg.self_attention)
    item_table = torch.from_numpy(item_vecs)
    cat_t = {pid: torch.from_numpy(rows) for pid, rows in catalogue.items()}
    log_pop = (torch.from_numpy(np.log1p(ud.item_counts(train_seqs, len(item_vecs)))).float()
               if cfg.popularity_prior else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Users sorted by length into batches keep padding (quadratic in T here) small.
    by_len = np.argsort(arrays.length, kind="stable")
    batches = [by_len[i:i + cfg.batch_users] for i in range(0, len(by_len), cfg.batch_users)]
    total_steps = cfg.epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    rng = np.random.default_rng(cfg.seed)
    history, best, best_state = [], -1.0, None
    start = time.monotonic()
    stopped_by_time = False
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total, count = 0.0, 0
        for bi in tqdm(rng.permutation(len(batches)), desc=f"epoch {epoch}/{cfg.epochs}",
                       unit="batch", leave=False, disable=None):
            b = batch_views(arrays, batches[bi], len(vocab), ud.MAX_EVENTS)
            loss, m = training_loss(model, b, item_table, cat_t, cfg.negatives,
                                    cfg.platform_dropout, gen, log_pop)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total += loss.item() * m
            count += m
        # A prior-trained model is selected as it will be served: with the prior added.
        prior = {} if log_pop is None else {
            "item_bias": log_pop.numpy(),
            "scale": 1.0 / float(model.log_temperature.detach().exp().clamp(min=0.01))}
        vis = evaluate(lambda w: model_vectors(model, w, item_vecs)[0], val, item_vecs,
                       catalogue, **prior)
        score = float(np.mean([v["ndcg@10"] for v in vis.values()]))
        elapsed = time.monotonic() - start
        history.append({"epoch": epoch, "train_loss": total / count, "examples": count,
                        "val": vis, "elapsed_s": round(elapsed, 1),
                        "temperature": float(model.log_temperature.detach().exp())})
        log.info("epoch %d/%d  loss %.4f  (%d examples)  val %s  tau %.4f  %.0fs", epoch,
                 cfg.epochs, total / count, count, _fmt(vis), history[-1]["temperature"],
                 elapsed)
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
            best_epoch = epoch
        if elapsed > cfg.max_train_s and epoch < cfg.epochs:
            log.warning("training stopped after epoch %d: over --max-train-s %.0f "
                        "(the result now depends on machine speed)", epoch, cfg.max_train_s)
            stopped_by_time = True
            break
    model.load_state_dict(best_state)
    model.eval()
    info = {"n_params": n_params, "best_epoch": best_epoch, "stopped_by_time": stopped_by_time,
            "train_s": round(time.monotonic() - start, 1), "batches_per_epoch": len(batches)}
    return model, history, info


def _table(rows: dict) -> str:
    lines = [f"{'':28s} {'visible R@10':>12s} {'N@10':>8s} {'hidden R@10':>12s} {'N@10':>8s}"]
    for name, m in rows.items():
        lines.append(f"{name:28s} {m['visible']['recall@10']:12.4f} {m['visible']['ndcg@10']:8.4f}"
                     f" {m['hidden']['recall@10']:12.4f} {m['hidden']['ndcg@10']:8.4f}")
    return "\n".join(lines)


def run(cfg: TrainConfig, repo: str | os.PathLike, dataset: str = AMAZON,
        encoder_version: int | None = None, item_data=None) -> tuple[Path, dict]:
    """Load data, train, evaluate model and baselines, export models/user_tower/<N>/."""
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
    train_ids, val_ids = ud.split_users([u["user_id"] for u in users])
    vocab = ud.platform_vocab([u for u in users if u["user_id"] in train_ids])
    seqs = [ud.to_seq(u, vocab) for u in users]
    train_seqs = [s for s in seqs if s.user_id in train_ids]
    val_seqs = [s for s in seqs if s.user_id in val_ids]
    catalogue = ud.catalogue_rows(ids, vocab)
    val = {"visible": ud.heldout_windows(val_seqs, False),
           "hidden": ud.heldout_windows(val_seqs, True)}
    log.info("%d users (%d train, %d validation), %d events dropped (item not in catalogue); "
             "validation queries: %s; data ready in %.0fs", len(users), len(train_seqs),
             len(val_seqs), missing, {k: len(w) for k, w in val.items()}, time.monotonic() - t0)

    pop = ud.popularity(train_seqs, catalogue, len(ids))
    results = {
        "time_decayed_mean": evaluate(lambda w: ud.baseline_vectors(w, item_vecs), val,
                                      item_vecs, catalogue),
        "time_decayed_mean_same_platform": evaluate(
            lambda w: ud.same_platform_baseline_vectors(w, item_vecs), val, item_vecs, catalogue),
        "popularity": {name: ud.metrics_from_ranks(ud.rank_by_score(pop, w, catalogue))
                       for name, w in val.items()},
    }
    log.info("baselines:\n%s", _table(results))

    model, history, info = train(cfg, train_seqs, vocab, item_vecs, catalogue, val)
    trained_actions = {int(a) for s in train_seqs for a in np.unique(s.actions)}
    tied = untrained_actions_like_interact(model, trained_actions)

    parity_feeds = [window_tensors(w, item_vecs) for w in val.values()]
    short = window_tensors(val["visible"], item_vecs, slice(0, 64))
    parity_feeds.append({k: (v[:, -7:] if v.ndim > 1 else v) for k, v in short.items()})
    for f in parity_feeds[-1:]:
        f["mask"] = f["mask"].copy()
        f["mask"][:, -1] = 1.0  # every row keeps at least one real event after the cut

    temperature = float(model.log_temperature.detach().exp().clamp(min=0.01))
    log_pop = np.log1p(ud.item_counts(train_seqs, len(ids)))

    def eval_onnx(onnx_path: Path, meta: dict) -> dict:
        onnx_metrics, blended = {}, {}
        for name, w in val.items():
            user_vec, _ = ort_run(onnx_path, window_tensors(w, item_vecs))
            onnx_metrics[name] = ud.metrics_from_ranks(
                ud.rank_of_targets(user_vec, w, item_vecs, catalogue))
            blended[name] = ud.metrics_from_ranks(ud.rank_of_targets(
                user_vec, w, item_vecs, catalogue, item_bias=log_pop, scale=1.0 / temperature))
        rows = {"user_tower (onnx)": onnx_metrics, **results,
                "user_tower/tau + log1p(count)": blended}
        log.info("validation (%d users, full ranking over the target platform's catalogue):\n%s",
                 len(val_seqs), _table(rows))
        meta["metrics"] = {"user_tower": onnx_metrics, **results,
                           "user_tower_plus_log_popularity": blended}
        meta["metrics"]["ndcg@10_ratio_vs_best_baseline"] = {
            s: onnx_metrics[s]["ndcg@10"] / max(results[b][s]["ndcg@10"] for b in results)
            for s in val}
        return meta

    meta = {
        "format": "onnx", "opset": OPSET, "model_file": "model.onnx",
        "input_names": list(INPUT_NAMES), "output_names": list(OUTPUT_NAMES),
        "inputs": {
            "item_vecs": {"dtype": "float32", "shape": ["batch", "events", item_vecs.shape[1]]},
            "platform_ids": {"dtype": "int64", "shape": ["batch", "events"]},
            "action_ids": {"dtype": "int64", "shape": ["batch", "events"]},
            "weights": {"dtype": "float32", "shape": ["batch", "events"]},
            "ages": {"dtype": "float32", "shape": ["batch", "events"]},
            "mask": {"dtype": "float32", "shape": ["batch", "events"]},
            "target_platform": {"dtype": "int64", "shape": ["batch"]},
        },
        "outputs": {
            "user_vec": {"dtype": "float32", "shape": ["batch", item_vecs.shape[1]],
                         "normalized": True},
            "event_weights": {"dtype": "float32", "shape": ["batch", "events"]},
        },
        "dim": int(item_vecs.shape[1]), "max_events": ud.MAX_EVENTS,
        "score": "dot(user_vec, item_vec); temperature is the training softmax temperature "
                 "(dot / temperature is a logit)",
        "temperature": temperature,
        "platform_vocab": vocab, "unknown_platform_id": 0,
        "action_vocab": {name: i for i, name in enumerate(ACTION_NAMES)},
        "actions_seen_in_training": sorted(trained_actions),
        "actions_tied_to_interact": tied,
        "features": {
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
        },
        "default_action_weight": {ACTION_NAMES[a]: w for a, w in DEFAULT_ACTION_WEIGHT.items()},
        "baseline": {"name": "time_decayed_mean",
                     "formula": "L2norm(sum_i weights_i * 0.5 ** (ages_i / half_life) * "
                                "item_vec_i)", "half_life_events": HALF_LIFE_EVENTS,
                     "implementation": "services.fusion.pooling.baseline_user_vec"},
        "encoder": encoder,
        "dataset": dataset,
        "split": {"rule": "export.user_data.split_users: random.Random(split_seed).sample of "
                          "sorted user ids", "val_fraction": ud.VAL_FRACTION,
                  "split_seed": ud.SPLIT_SEED, "train_users": len(train_seqs),
                  "val_users": len(val_seqs)},
        "evaluation": "each validation user's heldout_target rows, each ranked among its "
                      "platform's whole catalogue given the user's history rows (last "
                      "max_events); hidden: the target platform's events removed from the input",
        "seed": cfg.seed, "train_config": asdict(cfg), "training": {**info, "history": history},
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "exporter": {"torch": torch.__version__, "python": _platform.python_version(),
                     "threads": torch.get_num_threads()},
    }
    arrays = None
    if cfg.popularity_prior:
        meta["score"] = ("dot(user_vec, item_vec) / temperature + log1p(count), count from "
                         "item_popularity.npz (events among training users; 0 if absent)")
        counts = ud.item_counts(train_seqs, len(ids))
        arrays = {"item_popularity.npz": {
            "platforms": np.array([p for p, _ in ids]), "item_ids": np.array([i for _, i in ids]),
            "counts": counts.astype(np.int64)}}
    path, meta = write_version(repo, model, meta, parity_feeds, eval_onnx, arrays)
    log.info("wrote %s (total %.0fs)", path, time.monotonic() - t0)
    return path, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repo", default=os.environ.get("CROSSREC_MODEL_REPO", "models"))
    parser.add_argument("--dataset", default=AMAZON)
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
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed, max_train_s=args.max_train_s,
                      self_attention=not args.no_self_attention,
                      popularity_prior=args.popularity_prior)
    run(cfg, args.model_repo, args.dataset, args.encoder_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
