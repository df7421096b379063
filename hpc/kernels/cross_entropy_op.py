"""Softmax cross-entropy (cross_entropy.cu) as a torch.autograd.Function.

The forward kernel writes the per-row loss and, when the logits need a gradient and the reduction is
'mean' or 'sum', the gradient too (read the logits once, write the gradient once). The backward then
only multiplies it by the upstream gradient, on the device and skipped there when that is 1. A second
backward (retain_graph) or reduction='none' recomputes the gradient from the saved logits instead.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _runtime as rt

_SRC = "cross_entropy.cu"
_ones: dict = {}


# Rows longer than registers hold but at most this many bytes go through shared memory (read once from
# device memory, at one or two blocks per SM); longer rows stream twice through L2. A tuning knob:
# which is faster at which size is for the GPU benchmark to say (docs/kernels.md).
SMEM_ROW_MAX_BYTES = 160 * 1024


def _exprs(ct: str) -> list[str]:
    regs = [f"ce_fwd_reg<{ct}, {k}>" for k in rt.npts("ce_fwd_reg", ct)]
    return regs + [f"ce_fwd_smem<{ct}>", f"ce_fwd_stream<{ct}>", f"scale_inplace<{ct}>"]


def _fn(dtype: torch.dtype, expr: str):
    ct = rt.CTYPES[dtype][0]
    return rt.function(_SRC, ct, lambda: _exprs(ct), expr.format(ct=ct))


def rows(logits, target, ignore_index, smoothing, loss, grad, scale, stride) -> None:
    """One kernel launch over all rows: per-row loss into ``loss`` and/or the gradient into ``grad``
    (either may be None), gradient rows times scale[r * stride]."""
    B, C = logits.shape
    npt, threads = rt.row_plan(C, rt.npts("ce_fwd_reg", rt.CTYPES[logits.dtype][0])[-1])
    smem = 0
    if npt:
        fn = _fn(logits.dtype, f"ce_fwd_reg<{{ct}}, {npt}>")
    elif C * logits.element_size() <= min(SMEM_ROW_MAX_BYTES, rt.smem_optin() - rt.STATIC_SMEM_RESERVE):
        smem = C * logits.element_size()
        fn = _fn(logits.dtype, "ce_fwd_smem<{ct}>")
        rt.allow_smem(fn, smem)
    else:
        fn = _fn(logits.dtype, "ce_fwd_stream<{ct}>")
    acc_np = rt.CTYPES[logits.dtype][2]
    rt.launch(fn, (B,), (threads,),
              (logits, target, np.int32(C), np.int64(ignore_index), acc_np(smoothing), loss, grad, scale,
               np.int64(stride)), shared_mem=smem)


def _one(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    t = _ones.get(key)
    if t is None:
        t = _ones[key] = torch.ones(1, dtype=dtype, device=device)
    return t


class SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, smoothing, reduction):
        B, C = logits.shape
        acc = rt.CTYPES[logits.dtype][1]
        loss_rows = torch.empty(B, dtype=acc, device=logits.device)
        scale = None
        if reduction == "mean":
            count = (target != ignore_index).sum().to(acc)
            scale = count.reciprocal().reshape(1)
        elif reduction == "sum":
            scale = _one(acc, logits.device)
        grad = None
        if ctx.needs_input_grad[0] and reduction != "none" and B > 0 and C > 0:
            grad = torch.empty_like(logits)
        if B > 0:
            rows(logits, target, ignore_index, smoothing, loss_rows, grad, scale, 0)
        if reduction == "none":
            out = loss_rows.to(logits.dtype)
        elif reduction == "sum":
            out = loss_rows.sum().to(logits.dtype)
        else:  # 0/0 = NaN when every row is ignored, like F.cross_entropy
            out = (loss_rows.sum() / count).to(logits.dtype)
        ctx.save_for_backward(logits, target, scale)
        ctx.grad = grad
        ctx.meta = (ignore_index, smoothing, reduction)
        return out

    @staticmethod
    def backward(ctx, g):
        logits, target, scale = ctx.saved_tensors
        ignore_index, smoothing, reduction = ctx.meta
        acc = rt.CTYPES[logits.dtype][1]
        if logits.numel() == 0:
            return torch.zeros_like(logits), None, None, None, None
        if ctx.grad is not None:  # first backward of 'mean'/'sum': scale the gradient made in forward
            grad, ctx.grad = ctx.grad, None
            gs = g.reshape(1).to(acc)
            rt.launch(_fn(logits.dtype, "scale_inplace<{ct}>"), (rt.grid_1d(grad.numel()),), (256,),
                      (grad, np.int64(grad.numel()), gs))
            return grad, None, None, None, None
        grad = torch.empty_like(logits)
        if reduction == "none":
            rs, stride = g.to(acc).contiguous(), 1
        else:
            rs, stride = (g.reshape(1).to(acc) * scale).contiguous(), 0
        rows(logits, target, ignore_index, smoothing, None, grad, rs, stride)
        return grad, None, None, None, None


def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                          label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on the GPU; see hpc.models.ops.softmax_cross_entropy."""
    op = "softmax_cross_entropy"
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction={reduction!r}: must be one of mean, sum, none")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing={label_smoothing}: must be in [0, 1]")
    rt.check(op, "logits", logits, dtypes=rt.FLOAT_DTYPES, ndim=2)
    rt.check(op, "target", target, dtypes=(torch.int64, torch.int32), device=logits.device, ndim=1)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"{op}: target has {target.shape[0]} rows but logits {tuple(logits.shape)} has "
                         f"{logits.shape[0]}")
    rt.check_rows(op, logits.shape[0], logits.shape[1], "classes")
    return SoftmaxCrossEntropy.apply(logits, target.long(), int(ignore_index), float(label_smoothing), reduction)
