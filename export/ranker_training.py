"""Ranker training: sampled next-item queries of the training users, their candidates and
features through the serving pipeline (each training user left out of the co-visit counts and
the popularity), and the listwise-trained MLP (make_ranker, train_ranker)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from export import user_data as ud
from export.candidates import CANDIDATES, COVISIT_CANDIDATES, batch_retrieve
from export.metrics import ndcg_of_positions
from export.rank_data import Query, RankData, local_row, seq_query, user_contexts
from recmodel import pipeline
from recmodel.features import popularity_features

log = logging.getLogger("export.ranker")


# ---------------------------------------------------------------------------- training data

@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    candidates: int = CANDIDATES
    covisit_candidates: int = COVISIT_CANDIDATES
    positions_per_user: int = 6    # sampled next-item positions per training user
    # ...plus each platform's last event, the position the evaluation (and a backend asking
    # "what next") predicts: better validation NDCG@10 warm and cold
    # (bench/results/export-decisions.md).
    last_per_platform: bool = True
    cold_fraction: float = 0.5     # of those, the share made cold-platform examples
    dev_fraction: float = 0.1      # training users kept for early stopping (never val users)
    hidden: tuple[int, ...] = (64, 32)
    # A fixed number of epochs (the dev-best kept), not a time budget: the model must not
    # depend on how busy the export machine was.
    epochs: int = 6
    batch: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 3
    max_train_s: float = 1800.0  # a safety stop only



def training_queries(data: RankData, users: list[ud.UserSeq], cfg: TrainConfig,
                     rng: np.random.Generator) -> list[Query]:
    """Sampled next-item positions of `users` (every position t >= 1 of the whole sequence is
    a candidate, and with last_per_platform each platform's last event is added); each
    becomes a cold-platform example with probability cold_fraction (when the user has
    earlier events on another platform), else a warm one."""
    out = []
    for s in users:
        positions = np.arange(1, len(s.items))
        take = rng.choice(positions, size=min(cfg.positions_per_user, len(positions)),
                          replace=False)
        if cfg.last_per_platform:
            last = [int(np.flatnonzero(s.platforms == p)[-1]) for p in set(s.platforms.tolist())]
            take = np.union1d(take, [t for t in last if t >= 1])
        for t in sorted(take.tolist()):
            cold = rng.random() < cfg.cold_fraction
            q = seq_query(data, s, t, cold) if cold else None
            out.append(q if q is not None else seq_query(data, s, t, False))
    return out


def leave_user_out_popularity(data: RankData, s: ud.UserSeq) -> dict[str, tuple]:
    """Per platform, (log_pop, pop_pct) float32 [table rows] of training counts without user
    `s`'s own events: a validation user's events are not in the counts either, so a target's
    popularity is not inflated by the very event being predicted."""
    counts = data.counts.copy()
    if s.user_id in data.train_ids:
        np.subtract.at(counts, s.items, 1.0)
    return {p: popularity_features(counts[rows]) for p, rows in data.catalogue.items()}


def build_examples(model, data: RankData, users: list[ud.UserSeq], cfg: TrainConfig,
                   rng: np.random.Generator, chunk_users: int = 400, label: str = "train"):
    """(features float32 [M, N, F], target position int64 [M], stats) of the sampled queries
    whose target is among the CANDIDATES retrieved: serving's pipeline.candidates and
    pipeline.features, with training's batched exact retrieval, each training user left out
    of the co-visit counts and the popularity."""
    xs, ys = [], []
    n_queries = n_cold = n_kept = n_kept_cold = 0
    start = time.monotonic()
    for u0 in range(0, len(users), chunk_users):
        part = users[u0:u0 + chunk_users]
        queries = training_queries(data, part, cfg, rng)
        ctxs = user_contexts(model, data, queries)
        dense = batch_retrieve(data, np.stack([c.for_platform for c in ctxs]),
                               [q.target_platform for q in queries], cfg.candidates)
        own_of = {s.user_id: s.items if s.user_id in data.train_ids else None for s in part}
        pops = {s.user_id: leave_user_out_popularity(data, s) for s in part}
        for q, ctx, rows in zip(queries, ctxs, dense):
            cold = q.target_platform not in ctx.per_platform
            n_queries += 1
            n_cold += cold
            table = data.tables[q.target_platform]
            c = pipeline.candidates(ctx, table, data.covisit, cfg.candidates,
                                    cfg.covisit_candidates, retrieve=lambda *_, r=rows: r,
                                    own_rows=own_of[q.user_id])
            hit = np.flatnonzero(c.rows == local_row(data, q))
            if not len(hit):
                continue
            n_kept += 1
            n_kept_cold += cold
            xs.append(pipeline.features(ctx, table, c, data.covisit,
                                        pops[q.user_id][q.target_platform]))
            ys.append(int(hit[0]))
        log.info("%s examples: %d/%d users, %d queries (%d cold), %d kept (target in top-%d)"
                 ", %.0fs", label, min(u0 + chunk_users, len(users)), len(users), n_queries,
                 n_cold, n_kept, cfg.candidates, time.monotonic() - start)
    stats = {"queries": n_queries, "cold_queries": n_cold, "kept": n_kept,
             "kept_cold": n_kept_cold, "candidates": cfg.candidates,
             "candidate_recall": n_kept / max(n_queries, 1),
             "candidate_recall_warm": (n_kept - n_kept_cold) / max(n_queries - n_cold, 1),
             "candidate_recall_cold": n_kept_cold / max(n_cold, 1)}
    return np.stack(xs), np.array(ys, np.int64), stats



# ---------------------------------------------------------------------------- model

def _torch():
    import torch
    return torch


def make_ranker(mean: np.ndarray, std: np.ndarray, hidden=(64, 32)):
    """MLP over standardised features plus a linear skip; mean/std are buffers so serving
    feeds raw features."""
    torch = _torch()
    nn = torch.nn

    class Ranker(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
            layers, width = [], len(mean)
            for h in hidden:
                layers += [nn.Linear(width, h), nn.GELU()]
                width = h
            layers.append(nn.Linear(width, 1))
            self.mlp = nn.Sequential(*layers)
            self.skip = nn.Linear(len(mean), 1, bias=False)

        def forward(self, features):
            x = (features - self.mean) / self.std
            return (self.mlp(x) + self.skip(x)).squeeze(-1)

    return Ranker()


def feature_norm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over every candidate of `x` [M, N, F]; std 1 where constant."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)



def train_ranker(x: np.ndarray, y: np.ndarray, x_dev: np.ndarray, y_dev: np.ndarray,
                 cfg: TrainConfig):
    """Listwise softmax cross-entropy over candidates; returns (best-on-dev model, history)."""
    torch = _torch()
    F = torch.nn.functional
    torch.manual_seed(cfg.seed)
    mean, std = feature_norm(x)
    model = make_ranker(mean, std, cfg.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(x) / cfg.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    xd = torch.from_numpy(x_dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    history, best, best_state, bad = [], -1.0, None, 0
    start = time.monotonic()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for b0 in tqdm(range(0, len(x), cfg.batch), desc=f"epoch {epoch}/{cfg.epochs}",
                       unit="batch", leave=False, disable=None):
            idx = perm[b0:b0 + cfg.batch]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            dev_scores = model(xd).numpy()
        dev_loss = float(F.cross_entropy(torch.from_numpy(dev_scores), torch.from_numpy(y_dev)))
        ndcg, hr = ndcg_of_positions(dev_scores, y_dev)
        elapsed = time.monotonic() - start
        history.append({"epoch": epoch, "train_loss": total / len(x), "dev_loss": dev_loss,
                        "dev_ndcg@10": ndcg, "dev_hr@10": hr, "elapsed_s": round(elapsed, 1)})
        log.info("epoch %2d  train loss %.4f  dev loss %.4f  dev NDCG@10 %.4f HR@10 %.4f  %.0fs",
                 epoch, total / len(x), dev_loss, ndcg, hr, elapsed)
        if ndcg > best:
            best, bad = ndcg, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        if bad >= cfg.patience or elapsed > cfg.max_train_s:
            break
    model.load_state_dict(best_state)
    model.eval()
    return model, history

