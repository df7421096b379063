"""Matrix-factorization recommender: ``mu + b_u + b_i + <p_u, q_i>`` over ``ratings`` shards.

Fields ``user`` and ``item`` (int indices) and ``rating`` (the target). ``loss: mse`` for explicit
ratings; ``loss: bce`` for implicit feedback (ratings in {0, 1}, the prediction is a logit).
The global mean ``mu`` is a learned scalar initialised from ``schema["rating_mean"]`` when the
manifest's statistics provide it (saves the first epochs of learning the offset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hpc.models._layers import Embedding
from hpc.util.typed import require
from hpc.models.families import register_model, schema_int


@dataclass
class MFConfig:
    dim: int = 16
    loss: Literal["mse", "bce"] = "mse"
    init_std: float = 0.05
    user: str = "user"
    item: str = "item"
    target: str = "rating"

    def check(self, where: str) -> None:
        require(self.dim > 0, f"{where}.dim", f"must be > 0, got {self.dim}")
        require(self.init_std > 0, f"{where}.init_std", f"must be > 0, got {self.init_std}")


class MF(nn.Module):
    def __init__(self, n_users: int, n_items: int, cfg: MFConfig, mu: float):
        super().__init__()
        self.cfg = cfg
        self.user_emb = Embedding(n_users, cfg.dim, cfg.init_std)
        self.item_emb = Embedding(n_items, cfg.dim, cfg.init_std)
        self.user_bias = Embedding(n_users, 1, 0.0)
        self.item_bias = Embedding(n_items, 1, 0.0)
        self.mu = nn.Parameter(torch.tensor(float(mu)))

    def forward(self, batch: dict) -> torch.Tensor:
        u, i = batch[self.cfg.user].long(), batch[self.cfg.item].long()
        dot = (self.user_emb(u) * self.item_emb(i)).sum(1)
        return self.mu + self.user_bias(u)[:, 0] + self.item_bias(i)[:, 0] + dot

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-sample loss (the trainer weights and averages it)."""
        y = batch[self.cfg.target].to(pred.dtype)
        if self.cfg.loss == "bce":
            return nn.functional.binary_cross_entropy_with_logits(pred, y, reduction="none")
        return (pred - y) ** 2


@register_model("mf", config=MFConfig, task="ratings")
def build(cfg: MFConfig, schema: dict) -> nn.Module:
    mu = schema.get("rating_mean", 0.0) if cfg.loss == "mse" else 0.0
    return MF(schema_int(schema, "num_users"), schema_int(schema, "num_items"), cfg, float(mu or 0.0))
