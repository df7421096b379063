"""Layers whose fast path is a CuPy kernel, reached through ``hpc.models.ops`` only.

Models build on these modules so ``kernels: cupy|torch|auto`` (``ops.set_kernels``) swaps every
kernel at once. They hold parameters; ``ops`` holds the functions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hpc.models import ops

ACTIVATIONS = (*ops.ACTIVATIONS, "none")


class BiasAct(nn.Module):
    """``act(x @ W^T + b)``: the matmul in torch, bias + activation fused by ``ops.bias_act``."""

    def __init__(self, d_in: int, d_out: int, act: str = "relu"):
        super().__init__()
        assert act in ACTIVATIONS, act
        self.act = act
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.empty(d_out))
        # nn.Linear's default init, so results match a plain nn.Linear of the same seed.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(d_in) if d_in > 0 else 0
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.t()
        if self.act == "none":
            return y + self.bias
        return ops.bias_act(y, self.bias, self.act)


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class Embedding(nn.Module):
    def __init__(self, n: int, d: int, std: float = 0.01):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, d) * std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return ops.embedding(idx, self.weight)
