"""User tower training: next-item examples of every training user as masks over whole
sequences, the sampled-softmax loss, the training loop, and the full-ranking validation it
selects the best epoch by (export.metrics)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from export import metrics
from export import user_data as ud
from export.user_tower_model import (INPUT_NAMES, MASKED_LOGIT, MAX_TRAIN_SEQ, TrainConfig,
                                     UserTower)

log = logging.getLogger("export.user_tower")


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
        neg_logit = neg_logit.masked_fill(neg[None, :] == tgt_item[sel][:, None], MASKED_LOGIT)
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
    return {name: metrics.metrics_from_ranks(metrics.rank_of_targets(vectors_fn(w), w, item_vecs,
                                                           catalogue, item_bias, scale))
            for name, w in val.items()}


def fmt_metrics(m: dict) -> str:
    return "  ".join(f"{s}: R@10 {v['recall@10']:.4f} N@10 {v['ndcg@10']:.4f}"
                     for s, v in m.items())


# ---------------------------------------------------------------------------- training loop

def seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class Trainer:
    """What one epoch of training works on; built by `train`."""
    model: UserTower
    arrays: TrainArrays
    batches: list[np.ndarray]
    n_platforms: int
    item_table: torch.Tensor
    catalogue: dict[int, torch.Tensor]
    log_pop: torch.Tensor | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    cfg: TrainConfig

    def epoch(self, epoch: int, rng: np.random.Generator) -> tuple[float, int]:
        """One pass over the batches in `rng`'s order: (summed loss, examples)."""
        model, cfg = self.model, self.cfg
        model.train()
        total, count = 0.0, 0
        for bi in tqdm(rng.permutation(len(self.batches)), desc=f"epoch {epoch}/{cfg.epochs}",
                       unit="batch", leave=False, disable=None):
            b = batch_views(self.arrays, self.batches[bi], self.n_platforms, ud.MAX_EVENTS)
            loss, m = training_loss(model, b, self.item_table, self.catalogue, cfg.negatives,
                                    cfg.platform_dropout, self.gen, self.log_pop)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            self.opt.step()
            self.sched.step()
            total += loss.item() * m
            count += m
        return total, count

    def validate(self, val: dict, item_vecs: np.ndarray, catalogue: dict) -> dict:
        """{setting: metrics} of the current model on the validation windows."""
        model = self.model
        # A prior-trained model is selected as it will be served: with the prior added.
        prior = {} if self.log_pop is None else {
            "item_bias": self.log_pop.numpy(),
            "scale": 1.0 / float(model.log_temperature.detach().exp().clamp(min=0.01))}
        return evaluate(lambda w: model_vectors(model, w, item_vecs)[0], val, item_vecs,
                        catalogue, **prior)


def trainer(cfg: TrainConfig, train_seqs: list[ud.UserSeq], vocab: dict[str, int],
            item_vecs: np.ndarray, catalogue: dict[int, np.ndarray]) -> Trainer:
    """The seeded model, its batches (users sorted by length), optimizer and schedule."""
    gen = seed_all(cfg.seed)
    arrays = train_arrays(train_seqs)
    model = UserTower(item_vecs.shape[1], len(vocab), cfg)
    log.info("model: %d parameters, self_attention=%s",
             sum(p.numel() for p in model.parameters()), cfg.self_attention)
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
    return Trainer(model, arrays, batches, len(vocab), item_table, cat_t, log_pop, opt, sched,
                   gen, cfg)


def train(cfg: TrainConfig, train_seqs: list[ud.UserSeq], vocab: dict[str, int],
          item_vecs: np.ndarray, catalogue: dict[int, np.ndarray], val: dict) -> tuple:
    """Train; returns (best model by mean val NDCG@10 over both settings, history, info)."""
    t = trainer(cfg, train_seqs, vocab, item_vecs, catalogue)
    model = t.model
    rng = np.random.default_rng(cfg.seed)
    history, best, best_state = [], -1.0, None
    start = time.monotonic()
    stopped_by_time = False
    for epoch in range(1, cfg.epochs + 1):
        total, count = t.epoch(epoch, rng)
        vis = t.validate(val, item_vecs, catalogue)
        score = float(np.mean([v["ndcg@10"] for v in vis.values()]))
        elapsed = time.monotonic() - start
        history.append({"epoch": epoch, "train_loss": total / count, "examples": count,
                        "val": vis, "elapsed_s": round(elapsed, 1),
                        "temperature": float(model.log_temperature.detach().exp())})
        log.info("epoch %d/%d  loss %.4f  (%d examples)  val %s  tau %.4f  %.0fs", epoch,
                 cfg.epochs, total / count, count, fmt_metrics(vis), history[-1]["temperature"],
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
    info = {"n_params": sum(p.numel() for p in model.parameters()), "best_epoch": best_epoch,
            "stopped_by_time": stopped_by_time, "train_s": round(time.monotonic() - start, 1),
            "batches_per_epoch": len(t.batches)}
    return model, history, info
