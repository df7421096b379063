"""Optimizers (SGD / momentum / Nesterov, Adam, AdamW) and learning-rate schedules.

The schedule is a pure function ``lr_at(step, cfg, total_steps, world_size)`` evaluated every step
and written into the optimizer's param groups, so it has no state of its own to checkpoint beyond
the step counter (resume recomputes it exactly).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hpc.models import ops
from hpc.train.config import OptimConfig


def base_lr(cfg: OptimConfig, world_size: int) -> float:
    """The configured lr, times the world size under the linear scaling rule."""
    return cfg.lr * (world_size if cfg.lr_scaling == "linear" else 1)


def lr_at(step: int, cfg: OptimConfig, total_steps: int, world_size: int = 1) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule.

    Warmup ramps from lr/warmup to lr over ``warmup_steps`` steps (never 0, so step 0 moves).
    ``cosine`` decays from lr to ``min_lr`` over the steps after warmup; ``step`` multiplies by
    ``gamma`` every ``step_size`` steps after warmup.
    """
    lr = base_lr(cfg, world_size)
    w = cfg.warmup_steps
    if step < w:
        return lr * (step + 1) / w
    t = step - w
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "step":
        return lr * cfg.gamma ** (t // cfg.step_size)
    span = max(total_steps - w, 1)
    frac = min(t / span, 1.0)
    floor = cfg.min_lr * (lr / cfg.lr)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on matrices/kernels only unless ``decay_bias_and_norm`` (common practice)."""
    if cfg.weight_decay == 0 or cfg.decay_bias_and_norm:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, world_size: int = 1) -> torch.optim.Optimizer:
    lr = base_lr(cfg, world_size)
    if cfg.fused:
        params = [p for p in model.parameters() if p.requires_grad]
        kernels = None if cfg.fused is True else cfg.fused
        try:
            if cfg.name == "sgd":
                return ops.fused_optimizer("sgd", params, lr=lr, momentum=cfg.momentum,
                                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, kernels=kernels)
            return ops.fused_optimizer(cfg.name, params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                       weight_decay=cfg.weight_decay, kernels=kernels)
        except ValueError as e:
            raise ValueError(f"optim.fused={cfg.fused!r}: {e}") from None
    groups = param_groups(model, cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    # foreach=False: the single-tensor path is bitwise stable across runs (exact-resume test).
    return cls(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
