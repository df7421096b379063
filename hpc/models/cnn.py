"""CNN for images: [conv3x3 -> BatchNorm -> ReLU] blocks with 2x2 max pooling, then an MLP head.

Input ``x`` of per-sample shape ``[C, H, W]``, ``[H, W]`` or ``[H*W]`` with a square ``H*W`` (flat
8x8 digits). BatchNorm uses each rank's local batch statistics (as DDP does without SyncBN), so
with ``batch_norm: true`` the result depends slightly on the world size; set it false for
world-size-invariant training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from hpc.models._layers import BiasAct
from hpc.util.typed import require
from hpc.models.families import field_shape, register_model, schema_int


@dataclass
class CNNConfig:
    input: str = "x"
    channels: list[int] = field(default_factory=lambda: [16, 32])
    convs_per_block: int = 1
    batch_norm: bool = True
    head_width: int = 64
    dropout: float = 0.0
    # How the feature maps reach the head: flatten (keeps position), or a global avg/max pool
    # (translation invariant, fewer head parameters: better when the object can be anywhere).
    pool: Literal["flatten", "avg", "max"] = "flatten"

    def check(self, where: str) -> None:
        require(len(self.channels) > 0 and all(c > 0 for c in self.channels), f"{where}.channels",
                f"need at least one block of > 0 channels, got {self.channels}")
        require(self.convs_per_block >= 1, f"{where}.convs_per_block", "must be >= 1")
        require(self.head_width >= 0, f"{where}.head_width", "must be >= 0 (0: no hidden layer)")
        require(0.0 <= self.dropout < 1.0, f"{where}.dropout", f"must be in [0, 1), got {self.dropout}")


def image_shape(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0]:
        s = math.isqrt(shape[0])
        return (1, s, s)
    raise ValueError(f"model 'cnn': field {name!r} has per-sample shape {list(shape)}; "
                     "expected [C, H, W], [H, W] or a flat square image")


class CNN(nn.Module):
    def __init__(self, chw: tuple[int, int, int], n_classes: int, cfg: CNNConfig):
        super().__init__()
        self.input, self.chw = cfg.input, chw
        layers: list[nn.Module] = []
        c, h, w = chw
        for out in cfg.channels:
            for _ in range(cfg.convs_per_block):
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=not cfg.batch_norm)]
                if cfg.batch_norm:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU(inplace=True))
                c = out
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        if cfg.pool != "flatten":
            layers.append(nn.AdaptiveAvgPool2d(1) if cfg.pool == "avg" else nn.AdaptiveMaxPool2d(1))
            h = w = 1
        self.features = nn.Sequential(*layers)
        d = c * h * w
        head: list[nn.Module] = []
        if cfg.head_width:
            head.append(BiasAct(d, cfg.head_width, act="relu"))
            d = cfg.head_width
        if cfg.dropout:
            head.append(nn.Dropout(cfg.dropout))
        head.append(BiasAct(d, n_classes, act="none"))
        self.head = nn.Sequential(*head)

    def forward(self, batch: dict) -> torch.Tensor:
        x = batch[self.input].reshape(-1, *self.chw)
        return self.head(self.features(x).flatten(1))


@register_model("cnn", config=CNNConfig, task="classification")
def build(cfg: CNNConfig, schema: dict) -> nn.Module:
    chw = image_shape(field_shape(schema, cfg.input), cfg.input)
    return CNN(chw, schema_int(schema, "num_classes"), cfg)
