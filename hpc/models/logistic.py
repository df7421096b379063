"""Logistic regression for binary classification (``num_classes`` must be 2).

It returns logits ``[B, 2] = [0, z]``, so softmax cross-entropy on them *is* the logistic loss
(softmax([0, z])[1] = sigmoid(z)) and the trainer, metrics and inference treat it like every other
classifier; the cost is one extra zero column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hpc.models.families import num_features, register_model, schema_int


@dataclass
class LogisticConfig:
    input: str = "x"


class Logistic(nn.Module):
    def __init__(self, d_in: int, input: str):
        super().__init__()
        self.input = input
        self.linear = nn.Linear(d_in, 1)

    def forward(self, batch: dict) -> torch.Tensor:
        z = self.linear(batch[self.input].flatten(1))
        return torch.cat([torch.zeros_like(z), z], dim=1)


@register_model("logistic", config=LogisticConfig, task="classification")
def build(cfg: LogisticConfig, schema: dict) -> nn.Module:
    c = schema_int(schema, "num_classes")
    if c != 2:
        raise ValueError(f"model.family 'logistic' needs 2 classes, the data has {c}; use 'softmax'")
    return Logistic(num_features(schema, cfg.input), cfg.input)
