"""Softmax (multinomial logistic) regression: one linear layer over the flattened input."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hpc.models._layers import BiasAct
from hpc.models.families import num_features, register_model, schema_int


@dataclass
class SoftmaxConfig:
    input: str = "x"


class Softmax(nn.Module):
    def __init__(self, d_in: int, n_classes: int, input: str):
        super().__init__()
        self.input = input
        self.linear = BiasAct(d_in, n_classes, act="none")

    def forward(self, batch: dict) -> torch.Tensor:
        return self.linear(batch[self.input].flatten(1))


@register_model("softmax", config=SoftmaxConfig, task="classification")
def build(cfg: SoftmaxConfig, schema: dict) -> nn.Module:
    return Softmax(num_features(schema, cfg.input), schema_int(schema, "num_classes"), cfg.input)
