"""One-launch Adam/AdamW and SGD steps over flat buffers (optim.cu); used by hpc.models.ops.FusedAdam/FusedSGD."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _runtime as rt

_SRC = "optim.cu"
_DTYPES = (torch.float32, torch.float64)


def _exprs(ct: str, vec: int) -> list[str]:
    return sorted({f"adam_step<{ct}, 1>", f"adam_step<{ct}, {vec}>", f"sgd_step<{ct}, 1>", f"sgd_step<{ct}, {vec}>"})


def _fn(dtype: torch.dtype, expr: str):
    ct = rt.CTYPES[dtype][0]
    return rt.function(_SRC, ct, lambda: _exprs(ct, rt.vec_width(dtype)), expr.format(ct=ct))


def _check(op: str, p: torch.Tensor, **bufs: torch.Tensor | None) -> None:
    rt.check(op, "param", p, dtypes=_DTYPES, ndim=1)
    for name, t in bufs.items():
        if t is not None:
            rt.check(op, name, t, dtypes=(p.dtype,), device=p.device, ndim=1)
            if t.numel() != p.numel():
                raise ValueError(f"{op}: {name} has {t.numel()} elements but param has {p.numel()}")


def adam_step(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, adamw, bias_c1, bias_c2) -> None:
    """In place: one Adam (adamw=False) or AdamW step over the flat buffers p, g, m, v."""
    _check("adam_step", p, grad=g, exp_avg=m, exp_avg_sq=v)
    n = p.numel()
    if n == 0:
        return
    s = np.float32 if p.dtype == torch.float32 else np.float64
    vec = rt.vec_width(p.dtype, p, g, m, v)
    rt.launch(_fn(p.dtype, f"adam_step<{{ct}}, {vec}>"), (rt.grid_1d(max(1, n // vec)),), (256,),
              (p, g, m, v, np.int64(n), s(lr), s(beta1), s(beta2), s(eps), s(weight_decay), np.int32(bool(adamw)),
               s(lr / bias_c1), s(math.sqrt(bias_c2))))


def sgd_step(p, g, buf, *, lr, momentum, dampening, weight_decay, nesterov, first) -> None:
    """In place: one SGD step (momentum buffer ``buf`` or None) over the flat buffers."""
    _check("sgd_step", p, grad=g, momentum_buffer=buf)
    n = p.numel()
    if n == 0:
        return
    s = np.float32 if p.dtype == torch.float32 else np.float64
    vec = rt.vec_width(p.dtype, p, g, buf)
    rt.launch(_fn(p.dtype, f"sgd_step<{{ct}}, {vec}>"), (rt.grid_1d(max(1, n // vec)),), (256,),
              (p, g, buf, np.int64(n), s(lr), s(momentum), s(dampening), s(weight_decay), np.int32(bool(nesterov)),
               np.int32(bool(first))))
