"""Regression heads: the model learns the target in standardized units, its output is in the
target's own units.

The trainer's data layer puts the training split's target statistics in the schema
(``schema["target"] = {"mean": m, "std": s}``, ``hpc.train.inputs``); the registry stores that
schema in the model card, so a model rebuilt from its card (``hpc infer``) applies the same
scaling. A head's output ``z`` is a standardized prediction and ``forward`` returns ``z * s + m``;
the trainer's regression loss is ``((prediction - y) / s) ** 2`` (``hpc.train.losses``), i.e. the
squared error of ``z`` against the standardized target, so learning rates do not depend on the
target's units and every reported prediction and metric is in them.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def target_scaling(schema: dict) -> tuple[float, float]:
    """``(mean, std)`` of the training targets recorded in ``schema`` (``(0, 1)`` without them;
    a zero or non-finite std counts as 1, so a constant target trains on its offset alone)."""
    t = schema.get("target") or {}
    mean, std = float(t.get("mean", 0.0)), float(t.get("std", 1.0))
    if not math.isfinite(mean):
        mean = 0.0
    if not (math.isfinite(std) and std > 0):
        std = 1.0
    return mean, std


class TargetScale(nn.Module):
    """``[B, 1]`` standardized outputs -> ``[B]`` predictions in the target's units. The statistics
    are buffers that are not saved with the weights: the card's schema is their one record."""

    def __init__(self, schema: dict):
        super().__init__()
        mean, std = target_scaling(schema)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # In float32 even under bf16 autocast: a target mean of 150 has no bf16 precision to spare.
        return z.float().reshape(-1) * self.std + self.mean


def target_std(model: nn.Module) -> float:
    """The std a regression model's outputs were scaled by (1.0 for a model without a TargetScale)."""
    return next((float(m.std) for m in model.modules() if isinstance(m, TargetScale)), 1.0)


def is_regression(schema: dict) -> bool:
    return schema.get("task") == "regression"
