"""LayerNorm (layer_norm.cu) as a torch.autograd.Function; saves mean and rstd (Acc dtype) for backward."""

from __future__ import annotations

import numpy as np
import torch

from . import _runtime as rt

_SRC = "layer_norm.cu"


def _exprs(ct: str) -> list[str]:
    out = [f"col_reduce<{ct}>", f"ln_fwd_stream<{ct}>", f"ln_bwd_stream<{ct}>"]
    out += [f"ln_fwd_reg<{ct}, {k}>" for k in rt.npts("ln_fwd_reg", ct)]
    out += [f"ln_bwd_reg<{ct}, {k}>" for k in rt.npts("ln_bwd_reg", ct)]
    return out


def _fn(dtype: torch.dtype, expr: str):
    ct = rt.CTYPES[dtype][0]
    return rt.function(_SRC, ct, lambda: _exprs(ct), expr.format(ct=ct))


def forward(x, weight, bias, eps, y=None):
    """(y, mean, rstd); y into the given buffer if any (tests pass a poisoned one)."""
    D = x.shape[-1]
    M = x.numel() // D if D else 0
    acc = rt.CTYPES[x.dtype][1]
    y = torch.empty_like(x) if y is None else y
    mean = torch.empty(M, dtype=acc, device=x.device)
    rstd = torch.empty(M, dtype=acc, device=x.device)
    if M > 0 and D > 0:
        npt, threads = rt.row_plan(D, rt.npts("ln_fwd_reg", rt.CTYPES[x.dtype][0])[-1])
        expr = f"ln_fwd_reg<{{ct}}, {npt}>" if npt else "ln_fwd_stream<{ct}>"
        rt.launch(_fn(x.dtype, expr), (M,), (threads,),
                  (x, weight, bias, y, mean, rstd, np.int32(D), rt.CTYPES[x.dtype][2](eps)))
    return y, mean, rstd


def backward(gy, x, weight, mean, rstd, want_w: bool, want_b: bool, gx=None):
    """(grad x, grad weight or None, grad bias or None); grad x into ``gx`` if given."""
    D = x.shape[-1]
    M = x.numel() // D if D else 0
    acc = rt.CTYPES[x.dtype][1]
    gx = torch.empty_like(x) if gx is None else gx
    if M == 0 or D == 0:
        z = torch.zeros(D, dtype=x.dtype, device=x.device)
        return gx, (z if want_w else None), (z.clone() if want_b else None)
    npt, threads = rt.row_plan(D, rt.npts("ln_bwd_reg", rt.CTYPES[x.dtype][0])[-1])
    G = max(1, min(M, rt.sm_count() * max(1, 2048 // threads)))
    # The streaming kernel accumulates into the partials with +=, so they start at zero there.
    alloc = torch.empty if npt else torch.zeros
    pw = alloc((G, D), dtype=acc, device=x.device) if want_w else None
    pb = alloc((G, D), dtype=acc, device=x.device) if want_b else None
    expr = f"ln_bwd_reg<{{ct}}, {npt}>" if npt else "ln_bwd_stream<{ct}>"
    rt.launch(_fn(x.dtype, expr), (G,), (threads,), (gy, x, weight, mean, rstd, gx, pw, pb, np.int64(M), np.int32(D)))
    out = []
    for want, part in ((want_w, pw), (want_b, pb)):
        if not want:
            out.append(None)
            continue
        o = torch.empty(D, dtype=x.dtype, device=x.device)
        rt.launch(_fn(x.dtype, "col_reduce<{ct}>"), (rt.grid_1d(D),), (256,), (part, o, np.int32(G), np.int64(D)))
        out.append(o)
    return gx, out[0], out[1]


class LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, rstd = ctx.saved_tensors
        want_w = weight is not None and ctx.needs_input_grad[1]
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        gx, gw, gb = backward(gy.contiguous(), x, weight, mean, rstd, want_w, want_b)
        return (gx if ctx.needs_input_grad[0] else None), gw, gb, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5):
    """LayerNorm over the last dimension on the GPU; see hpc.models.ops.layer_norm."""
    op = "layer_norm"
    rt.check(op, "x", x, dtypes=rt.FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension")
    D = x.shape[-1]
    rt.check_rows(op, x.numel() // D if D else 0, D, "last dimension")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            rt.check(op, name, t, dtypes=(x.dtype,), device=x.device, ndim=1)
            if t.shape[0] != D:
                raise ValueError(f"{op}: {name} shape {tuple(t.shape)} must be [{D}] (the last dimension of x)")
    if not eps > 0:
        raise ValueError(f"{op}: eps={eps}: must be > 0")
    return LayerNorm.apply(x, weight, bias, float(eps))
