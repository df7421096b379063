"""Embedding gather / scatter-add (embedding.cu) as a torch.autograd.Function."""

from __future__ import annotations

import numpy as np
import torch

from . import _runtime as rt

_SRC = "embedding.cu"
_CH = 4  # columns per lane per pass in the sorted backward: 128 columns per warp pass


def _exprs(ct: str, vec: int) -> list[str]:
    return sorted({f"emb_fwd<{ct}, 1>", f"emb_fwd<{ct}, {vec}>", f"emb_bwd_atomic<{ct}>",
                   f"emb_bwd_sorted<{ct}, {_CH}>"})


def _fn(dtype: torch.dtype, expr: str):
    ct = rt.CTYPES[dtype][0]
    return rt.function(_SRC, ct, lambda: _exprs(ct, rt.vec_width(dtype)), expr.format(ct=ct))


def forward(idx_flat: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight[idx_flat] ([n, D]) into ``out`` if given (tests pass a poisoned buffer)."""
    V, D = weight.shape
    n = idx_flat.numel()
    out = torch.empty((n, D), dtype=weight.dtype, device=weight.device) if out is None else out
    if n and D:
        vec = rt.vec_width(weight.dtype, weight, out, multiple_of=D)
        rt.launch(_fn(weight.dtype, f"emb_fwd<{{ct}}, {vec}>"), (rt.grid_1d(n * D // vec),), (256,),
                  (idx_flat, weight, out, np.int64(n), np.int64(V), np.int64(D)))
    return out


def backward(g: torch.Tensor, idx_flat: torch.Tensor, V: int, D: int, deterministic: bool) -> torch.Tensor:
    n = idx_flat.numel()
    dtype = g.dtype
    acc = rt.CTYPES[dtype][1]
    if n == 0 or D == 0:
        return torch.zeros((V, D), dtype=dtype, device=g.device)
    if deterministic:
        # Stable sort: equal indices keep position order, so every run sums in the same order.
        sorted_idx, perm = torch.sort(idx_flat, stable=True)
        gw = torch.zeros((V, D), dtype=dtype, device=g.device)
        rt.launch(_fn(dtype, f"emb_bwd_sorted<{{ct}}, {_CH}>"), (rt.grid_1d(n * 32),), (256,),
                  (sorted_idx, perm, g, gw, np.int64(n), np.int64(V), np.int64(D)))
        return gw
    accbuf = torch.zeros((V, D), dtype=acc, device=g.device)
    rt.launch(_fn(dtype, "emb_bwd_atomic<{ct}>"), (rt.grid_1d(n * D),), (256,),
              (idx_flat, g, accbuf, np.int64(n), np.int64(V), np.int64(D)))
    return accbuf if acc == dtype else accbuf.to(dtype)


class Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight, deterministic):
        idx_flat = idx.reshape(-1).long().contiguous()
        out = forward(idx_flat, weight)
        ctx.save_for_backward(idx_flat)
        ctx.meta = (weight.shape[0], weight.shape[1], deterministic)
        return out.reshape(*idx.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, g):
        (idx_flat,) = ctx.saved_tensors
        V, D, det = ctx.meta
        if not ctx.needs_input_grad[1]:
            return None, None, None
        gw = backward(g.contiguous().reshape(idx_flat.numel(), D), idx_flat, V, D, det)
        return None, gw, None


def embedding(idx: torch.Tensor, weight: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
    """Rows of weight at idx on the GPU; see hpc.models.ops.embedding."""
    op = "embedding"
    rt.check(op, "weight", weight, dtypes=rt.FLOAT_DTYPES, ndim=2)
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: idx must be an int64 or int32 tensor; got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)}")
    if idx.device != weight.device:
        raise ValueError(f"{op}: idx is on {idx.device} but weight is on {weight.device}")
    return Embedding.apply(idx, weight, bool(deterministic))
