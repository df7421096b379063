"""Fused bias + activation (bias_act.cu) as a torch.autograd.Function."""

from __future__ import annotations

import numpy as np
import torch

from . import _runtime as rt

ACTS = {"relu": 0, "gelu": 1, "gelu_tanh": 2}
_SRC = "bias_act.cu"


def _exprs(ct: str, vec: int) -> list[str]:
    out = [f"col_reduce<{ct}>"]
    for a in ACTS.values():
        out += [f"bias_act_fwd<{ct}, {a}, 1>", f"bias_act_fwd<{ct}, {a}, {vec}>", f"bias_act_bwd<{ct}, {a}>"]
    return sorted(set(out))


def _fn(dtype: torch.dtype, expr: str):
    ct = rt.CTYPES[dtype][0]
    return rt.function(_SRC, ct, lambda: _exprs(ct, rt.vec_width(dtype)), expr.format(ct=ct))


def _check(x: torch.Tensor, bias: torch.Tensor | None, act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"bias_act: act={act!r}: must be one of {', '.join(ACTS)}")
    rt.check("bias_act", "x", x, dtypes=rt.FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("bias_act: x must have at least one dimension")
    if bias is not None:
        rt.check("bias_act", "bias", bias, dtypes=(x.dtype,), device=x.device, ndim=1)
        if bias.shape[0] != x.shape[-1]:
            raise ValueError(f"bias_act: bias shape {tuple(bias.shape)} must be [{x.shape[-1]}] (the last "
                             f"dimension of x, shape {tuple(x.shape)})")


def forward(x: torch.Tensor, bias: torch.Tensor | None, act: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = act(x + bias) into ``out`` (tests pass a poisoned buffer) or a new tensor."""
    y = torch.empty_like(x) if out is None else out
    n, N = x.numel(), x.shape[-1]
    if n == 0:
        return y
    vec = rt.vec_width(x.dtype, x, y, multiple_of=N)
    fn = _fn(x.dtype, f"bias_act_fwd<{{ct}}, {ACTS[act]}, {vec}>")
    rt.launch(fn, (rt.grid_1d(n // vec),), (256,),
              (x, bias, y, np.int64(n), np.int64(N), np.int32(bias is not None)))
    return y


def _bwd_shape(M: int, N: int, want_partial: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    bx = 32
    while bx < N and bx < 256:
        bx *= 2
    by = 256 // bx
    gx = -(-N // bx)
    gy = max(1, min(-(-M // by), (rt.sm_count() * 8) // gx if want_partial else 65535, 65535))
    return (gx, gy), (bx, by)


def backward(gy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, act: str, want_bias_grad: bool,
             gx: torch.Tensor | None = None):
    """(grad x, grad bias or None); grad x into ``gx`` if given."""
    gx = torch.empty_like(x) if gx is None else gx
    n, N = x.numel(), x.shape[-1]
    M = n // N if N else 0
    if n == 0:
        return gx, (torch.zeros_like(bias) if want_bias_grad else None)
    grid, block = _bwd_shape(M, N, want_bias_grad)
    acc = rt.CTYPES[x.dtype][1]
    partial = torch.empty((grid[1], N), dtype=acc, device=x.device) if want_bias_grad else None
    rt.launch(_fn(x.dtype, f"bias_act_bwd<{{ct}}, {ACTS[act]}>"), grid, block,
              (gy, x, bias, gx, partial, np.int64(M), np.int64(N), np.int32(bias is not None)))
    gb = None
    if want_bias_grad:
        gb = torch.empty_like(bias)
        rt.launch(_fn(x.dtype, "col_reduce<{ct}>"), (rt.grid_1d(N),), (256,),
                  (partial, gb, np.int32(grid[1]), np.int64(N)))
    return gx, gb


class BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, act):
        ctx.save_for_backward(x, bias)
        ctx.act = act
        return forward(x, bias, act)

    @staticmethod
    def backward(ctx, gy):
        x, bias = ctx.saved_tensors
        want_b = bias is not None and ctx.needs_input_grad[1]
        gx, gb = backward(gy.contiguous(), x, bias, ctx.act, want_b)
        return (gx if ctx.needs_input_grad[0] else None), gb, None


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str = "relu") -> torch.Tensor:
    """act(x + bias) on the GPU; see hpc.models.ops.bias_act."""
    _check(x, bias, act)
    return BiasAct.apply(x, bias, act)
