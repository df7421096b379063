"""Linear regression: ``softmax``'s one linear layer with a single output, in standardized target
units (``hpc.models.regression``): the model returns predictions ``[B]`` in the target's units."""

from __future__ import annotations

import torch
from torch import nn

from hpc.models.families import num_features, register_model
from hpc.models.regression import TargetScale
from hpc.models.softmax import Softmax, SoftmaxConfig


class Linear(Softmax):
    def __init__(self, d_in: int, input: str, schema: dict):
        super().__init__(d_in, 1, input)
        self.scale = TargetScale(schema)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.scale(super().forward(batch))


@register_model("linear", config=SoftmaxConfig, task="regression")  # config: `input`, as softmax
def build(cfg: SoftmaxConfig, schema: dict) -> nn.Module:
    return Linear(num_features(schema, cfg.input), cfg.input, schema)
