"""The user tower's torch model (UserTower) and its training configuration; the ONNX contract
it is exported under is in export/user_tower.py."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from recmodel.pooling import ACTION_NAMES

INPUT_NAMES = ("item_vecs", "platform_ids", "action_ids", "weights", "ages", "mask",
               "target_platform")
OUTPUT_NAMES = ("user_vec", "event_weights")
N_ACTIONS = len(ACTION_NAMES)
# Longest training sequence per user (most recent events); Amazon users have at most 102.
MAX_TRAIN_SEQ = 128
# A masked logit: large enough to vanish in softmax, small enough to stay finite in fp32.
MASKED_LOGIT = -1e9


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
    # A guard, not a budget: 5 epochs take about 3 minutes on 2 idle cores on the Amazon data
    # and about 10 on MovieLens-1M (longer sequences); a stop by it makes the model depend on
    # the machine's speed.
    max_train_s: float = 1500.0


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
            scores = scores.masked_fill(~sa_allowed[:, None], MASKED_LOGIT)
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
        scores = scores.masked_fill(~allowed[..., None], MASKED_LOGIT)
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
