"""Multi-layer perceptron: [Linear -> norm -> bias+act -> dropout] x N -> Linear head.

Classification: logits ``[B, C]``. Regression (the data's task): one output in standardized target
units, returned in the target's units (``hpc.models.regression``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from hpc.models import ops
from hpc.models._layers import BiasAct, LayerNorm
from hpc.models.families import num_features, register_model, schema_int
from hpc.models.regression import TargetScale, is_regression
from hpc.util.typed import require


@dataclass
class MLPConfig:
    input: str = "x"
    widths: list[int] = field(default_factory=lambda: [128, 64])
    activation: Literal["relu", "gelu", "gelu_tanh"] = "relu"
    # batch: BatchNorm1d (statistics of the local batch on each rank, like DDP without SyncBN, so
    # results then depend on the world size); layer: LayerNorm through ops (world-size invariant).
    norm: Literal["none", "batch", "layer"] = "none"
    dropout: float = 0.0

    def check(self, where: str) -> None:
        require(all(w > 0 for w in self.widths), f"{where}.widths", f"widths must be > 0, got {self.widths}")
        require(0.0 <= self.dropout < 1.0, f"{where}.dropout", f"must be in [0, 1), got {self.dropout}")


class _Block(nn.Module):
    def __init__(self, d_in: int, d_out: int, cfg: MLPConfig):
        super().__init__()
        self.norm_kind = cfg.norm
        if cfg.norm == "none":
            self.fc = BiasAct(d_in, d_out, cfg.activation)
        else:
            # Normalize the pre-activation, then bias+act (the norm's shift is the bias).
            self.fc = nn.Linear(d_in, d_out, bias=False)
            self.norm = nn.BatchNorm1d(d_out) if cfg.norm == "batch" else LayerNorm(d_out)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.act = cfg.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_kind == "none":
            return self.drop(self.fc(x))
        h = self.norm(self.fc(x))
        return self.drop(ops.bias_act(h, None, self.act))


class MLP(nn.Module):
    def __init__(self, d_in: int, n_out: int, cfg: MLPConfig, scale: TargetScale | None = None):
        super().__init__()
        self.input = cfg.input
        dims = [d_in, *cfg.widths]
        self.blocks = nn.Sequential(*(_Block(a, b, cfg) for a, b in zip(dims[:-1], dims[1:])))
        self.head = BiasAct(dims[-1], n_out, act="none")
        self.scale = scale  # regression: standardized output -> the target's units

    def forward(self, batch: dict) -> torch.Tensor:
        out = self.head(self.blocks(batch[self.input].flatten(1)))
        return out if self.scale is None else self.scale(out)


@register_model("mlp", config=MLPConfig, task=("classification", "regression"))
def build(cfg: MLPConfig, schema: dict) -> nn.Module:
    d_in = num_features(schema, cfg.input)
    if is_regression(schema):
        return MLP(d_in, 1, cfg, TargetScale(schema))
    return MLP(d_in, schema_int(schema, "num_classes"), cfg)
