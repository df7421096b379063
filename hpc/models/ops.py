"""The layers with a CuPy fast path: the ONE module model code calls for them.

Each function computes the same mathematical function on two paths:

* ``torch``: plain PyTorch ops (CPU or GPU), autograd by PyTorch;
* ``cupy``: the hand-written kernels in ``kernels/`` (CUDA tensors only), wrapped as
  ``torch.autograd.Function`` s, zero-copy through DLPack on PyTorch's current stream.

``set_kernels("cupy"|"torch"|"auto")`` picks the path; ``auto`` (the default, or the value of the
``HPC_KERNELS`` environment variable) uses the kernels for CUDA tensors of a supported dtype when
CuPy imports, and the torch path otherwise, so the suite never *needs* a GPU. ``cupy`` without
CUDA or CuPy is a ValueError saying which is missing. Semantics follow PyTorch's
(``F.cross_entropy``'s label smoothing and ignore_index, ``F.layer_norm``, ``F.gelu``,
``torch.optim.Adam``/``AdamW``/``SGD``), and the tests hold both paths to one float64 reference.

The ``kernels`` package is imported lazily, here only (docs/DESIGN.md).
"""

from __future__ import annotations

import math
import os
from typing import Iterable

import torch
import torch.nn.functional as F

KERNEL_MODES = ("auto", "cupy", "torch")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
REDUCTIONS = ("mean", "sum", "none")
# dtypes the CuPy kernels are built for (fp32/fp64/bf16/fp16 storage, fp32 or fp64 accumulation).
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_mode: str | None = None  # resolved lazily from HPC_KERNELS so importing this module never fails
_cupy_reason: str | None | bool = False  # False = not probed yet; None = available; str = why not


def _cupy_missing() -> str | None:
    """Why the CuPy path cannot run here (None when it can); probed once per process."""
    global _cupy_reason
    if _cupy_reason is False:
        if not torch.cuda.is_available():
            _cupy_reason = "CUDA is not available to PyTorch (torch.cuda.is_available() is False)"
        else:
            from hpc.kernels import _runtime

            _cupy_reason = _runtime.cupy_missing()
    return _cupy_reason  # type: ignore[return-value]


def _checked_mode(mode: str) -> str:
    """``mode`` if it is a kernel mode that can run here; otherwise a ValueError that says why."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r}: must be one of {', '.join(KERNEL_MODES)}")
    if mode == "cupy":
        why = _cupy_missing()
        if why is not None:
            raise ValueError(f"kernels='cupy' cannot run here: {why}; use kernels='auto' or 'torch'")
    return mode


def set_kernels(mode: str) -> None:
    """Select the kernel path for every op in this module (process-wide)."""
    global _mode
    _mode = _checked_mode(mode)


def get_kernels() -> str:
    """The selected mode: 'auto', 'cupy' or 'torch'."""
    global _mode
    if _mode is None:
        env = os.environ.get("HPC_KERNELS", "auto")
        try:
            set_kernels(env)
        except ValueError as e:
            raise ValueError(f"environment variable HPC_KERNELS={env!r}: {e}") from None
    return _mode  # type: ignore[return-value]


def kernels_in_use(device: torch.device | str | None = None) -> str:
    """'cupy' or 'torch': what a CUDA (default) or CPU tensor would run on under the current mode."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    mode = get_kernels()
    if mode == "torch" or (mode == "auto" and (dev.type != "cuda" or _cupy_missing() is not None)):
        return "torch"
    return "cupy"


def _use_cupy(*tensors: torch.Tensor | None) -> bool:
    mode = get_kernels()
    if mode == "torch":
        return False
    if mode == "cupy":
        return True  # the kernel wrappers check device/dtype and say what is wrong
    # auto: the kernels take contiguous CUDA tensors of their dtypes; anything else runs on torch
    # (no silent copies).
    ts = [t for t in tensors if t is not None]
    if not ts or not all(t.is_cuda for t in ts) or _cupy_missing() is not None:
        return False
    dev = torch.cuda.current_device()
    floats = {t.dtype for t in ts if t.is_floating_point()}  # one dtype (mixed, e.g. under autocast: torch)
    return (all(t.is_contiguous() and t.device.index == dev for t in ts)
            and len(floats) <= 1 and floats <= set(KERNEL_DTYPES))


def _k():
    from hpc import kernels  # lazy: only the CuPy path needs it

    return kernels


# ----------------------------------------------------------------------------------------------
# bias + activation


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str = "relu") -> torch.Tensor:
    """``act(x + bias)`` with ``bias`` ([N] or None) broadcast over the last dimension of ``x``.

    act: 'relu', 'gelu' (erf form, ``F.gelu``) or 'gelu_tanh' (``F.gelu(approximate='tanh')``).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: act={act!r}: must be one of {', '.join(ACTIVATIONS)}")
    if bias is not None and (bias.dim() != 1 or x.dim() == 0 or bias.shape[0] != x.shape[-1]):
        raise ValueError(f"bias_act: bias shape {tuple(bias.shape)} must be [{x.shape[-1] if x.dim() else '?'}] "
                         f"(the last dimension of x, shape {tuple(x.shape)})")
    if _use_cupy(x, bias):
        return _k().bias_act(x, bias, act)
    z = x if bias is None else x + bias
    if act == "relu":
        return F.relu(z)
    return F.gelu(z, approximate="tanh" if act == "gelu_tanh" else "none")


# ----------------------------------------------------------------------------------------------
# softmax cross-entropy


def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                          label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``softmax(logits)`` ([B, C]) against class indices ``target`` ([B]).

    Same function as ``F.cross_entropy(logits, target, ignore_index=..., label_smoothing=...,
    reduction=...)``: per row ``(1-s) * -log p[t] + s/C * sum_c -log p[c]``; rows whose target is
    ``ignore_index`` give 0 and do not count; 'mean' divides by the number of counted rows (NaN
    when there are none, like PyTorch).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"softmax_cross_entropy: reduction={reduction!r}: must be one of {', '.join(REDUCTIONS)}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"softmax_cross_entropy: label_smoothing={label_smoothing}: must be in [0, 1]")
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"softmax_cross_entropy: logits must be [B, C] and target [B]; got logits "
                         f"{tuple(logits.shape)}, target {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"softmax_cross_entropy: target dtype {target.dtype}: must be torch.int64 or torch.int32")
    if _use_cupy(logits, target):
        return _k().softmax_cross_entropy(logits, target, int(ignore_index), float(label_smoothing), reduction)
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index,
                           label_smoothing=float(label_smoothing), reduction=reduction)


# ----------------------------------------------------------------------------------------------
# layer norm


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` (``F.layer_norm(x, x.shape[-1:], weight, bias, eps)``)."""
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dimension")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"layer_norm: {name} shape {tuple(t.shape)} must be [{n}] (the last dimension of x)")
    if _use_cupy(x, weight, bias):
        return _k().layer_norm(x, weight, bias, float(eps))
    return F.layer_norm(x, (n,), weight, bias, eps)


# ----------------------------------------------------------------------------------------------
# embedding


def embedding(idx: torch.Tensor, weight: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
    """Rows of ``weight`` ([V, D]) at ``idx`` (any shape, int64/int32): result ``idx.shape + [D]``.

    ``deterministic=True`` makes the backward (scatter-add into the [V, D] gradient) bitwise
    reproducible on the CuPy path (sorted segments, no float atomics); so does
    ``torch.use_deterministic_algorithms(True)``. PyTorch's own embedding backward (the torch path)
    is already sort-based and deterministic.
    """
    if weight.dim() != 2:
        raise ValueError(f"embedding: weight must be [V, D]; got shape {tuple(weight.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"embedding: idx dtype {idx.dtype}: must be torch.int64 or torch.int32")
    if _use_cupy(idx, weight):
        det = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
        return _k().embedding(idx, weight, det)
    return F.embedding(idx, weight)


# ----------------------------------------------------------------------------------------------
# optimizers over one flat parameter buffer


class _FlatOptimizer(torch.optim.Optimizer):
    """Moves all parameters (one dtype, one device) into one flat buffer, and their gradients into
    another, so one kernel launch (CuPy) or a handful of whole-buffer ops (torch) updates them all.

    ``p.data`` and ``p.grad`` become views of the buffers; autograd accumulates into the existing
    ``.grad`` in place, so the views survive ``backward``. ``zero_grad`` zeroes the flat gradient
    (never sets it to None). A gradient that was replaced by another tensor is copied back in.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], defaults: dict, kernels: str | None = None):
        # kernels: None/"auto" follows set_kernels(); "cupy" or "torch" pins this optimizer's step to one
        # path (the trainer's optim.fused=cupy|torch), whatever the layers use.
        try:
            mode = _checked_mode(kernels or "auto")
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None
        self._kernels = None if mode == "auto" else mode
        params = [p for p in params]
        if params and isinstance(params[0], dict):
            raise ValueError(f"{type(self).__name__}: parameter groups are not supported; pass one list of parameters")
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        super().__init__(params, defaults)
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1 or params[0].dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{type(self).__name__}: all parameters must share one device and dtype float32 or "
                             f"float64; got dtypes {sorted(map(str, dtypes))}, devices {sorted(map(str, devices))}")
        self._params = params
        total = sum(p.numel() for p in params)
        like = params[0]
        self.flat_param = torch.empty(total, dtype=like.dtype, device=like.device)
        self.flat_grad = torch.zeros(total, dtype=like.dtype, device=like.device)
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []
        off = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                pv = self.flat_param[off:off + n].view_as(p)
                gv = self.flat_grad[off:off + n].view_as(p)
                pv.copy_(p)
                if p.grad is not None:
                    gv.copy_(p.grad)
                p.data = pv
                p.grad = gv
                self._views.append((p, gv))
                off += n
        self.step_count = 0

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002 - views must survive
        self.flat_grad.zero_()
        for p, gv in self._views:
            if p.grad is not gv:
                p.grad = gv

    def _gather_grads(self) -> None:
        # Host-side pointer comparison only: no device sync on the hot path.
        for p, gv in self._views:
            g = p.grad
            if g is None:
                gv.zero_()
                p.grad = gv
            elif g.data_ptr() != gv.data_ptr():
                gv.copy_(g)
                p.grad = gv

    @property
    def kernel_path(self) -> str:
        """'cupy' or 'torch': what the next step runs on."""
        return "cupy" if self._use_cupy() else "torch"

    def _use_cupy(self) -> bool:
        if self._kernels is not None:
            return self._kernels == "cupy"  # the kernel wrapper checks device/dtype and says what is wrong
        return _use_cupy(self.flat_param)


class FusedAdam(_FlatOptimizer):
    """Adam (``adamw=False``, L2 weight decay added to the gradient) or AdamW (decoupled decay),
    the same update as ``torch.optim.Adam``/``AdamW`` (no amsgrad), over one flat buffer."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, adamw: bool = True, kernels: str | None = None):
        if not lr >= 0.0 or not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"FusedAdam: lr={lr}, eps={eps}, weight_decay={weight_decay}: all must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FusedAdam: betas={betas}: each must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adamw=adamw),
                         kernels)
        self.exp_avg = torch.zeros_like(self.flat_param)
        self.exp_avg_sq = torch.zeros_like(self.flat_param)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._gather_grads()
        g = self.param_groups[0]
        self.step_count += 1
        t = self.step_count
        b1, b2 = g["betas"]
        # Bias corrections on the host from a host step count: no device sync (like torch's
        # non-capturable Adam).
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        if self._use_cupy():
            _k().adam_step(self.flat_param, self.flat_grad, self.exp_avg, self.exp_avg_sq, lr=g["lr"], beta1=b1,
                           beta2=b2, eps=g["eps"], weight_decay=g["weight_decay"], adamw=g["adamw"],
                           bias_c1=bc1, bias_c2=bc2)
            return loss
        p, grad, m, v = self.flat_param, self.flat_grad, self.exp_avg, self.exp_avg_sq
        lr, wd = g["lr"], g["weight_decay"]
        if wd != 0.0:
            if g["adamw"]:
                p.mul_(1.0 - lr * wd)
            else:
                grad = grad.add(p, alpha=wd)
        m.lerp_(grad, 1.0 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        denom = (v.sqrt() / math.sqrt(bc2)).add_(g["eps"])
        p.addcdiv_(m, denom, value=-lr / bc1)
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["flat"] = {"step": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        return sd

    def load_state_dict(self, state_dict):
        flat = state_dict["flat"]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "flat"})
        self.step_count = int(flat["step"])
        self.exp_avg.copy_(flat["exp_avg"])
        self.exp_avg_sq.copy_(flat["exp_avg_sq"])


class FusedSGD(_FlatOptimizer):
    """SGD with optional momentum/dampening/Nesterov and L2 weight decay, the same update as
    ``torch.optim.SGD`` (the first step's momentum buffer is the gradient itself), over one flat buffer."""

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, kernels: str | None = None):
        if not lr >= 0.0 or not momentum >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"FusedSGD: lr={lr}, momentum={momentum}, weight_decay={weight_decay}: all must be >= 0")
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError("FusedSGD: nesterov=True needs momentum > 0 and dampening == 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov), kernels)
        self.momentum_buffer = torch.zeros_like(self.flat_param) if momentum != 0.0 else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._gather_grads()
        g = self.param_groups[0]
        first = self.step_count == 0
        self.step_count += 1
        if self._use_cupy():
            _k().sgd_step(self.flat_param, self.flat_grad, self.momentum_buffer, lr=g["lr"], momentum=g["momentum"],
                          dampening=g["dampening"], weight_decay=g["weight_decay"], nesterov=g["nesterov"],
                          first=first)
            return loss
        p, grad, buf = self.flat_param, self.flat_grad, self.momentum_buffer
        if g["weight_decay"] != 0.0:
            grad = grad.add(p, alpha=g["weight_decay"])
        if buf is not None:
            if first:
                buf.copy_(grad)
            else:
                buf.mul_(g["momentum"]).add_(grad, alpha=1.0 - g["dampening"])
            grad = grad.add(buf, alpha=g["momentum"]) if g["nesterov"] else buf
        p.add_(grad, alpha=-g["lr"])
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["flat"] = {"step": self.step_count, "momentum_buffer": self.momentum_buffer}
        return sd

    def load_state_dict(self, state_dict):
        flat = state_dict["flat"]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "flat"})
        self.step_count = int(flat["step"])
        if self.momentum_buffer is not None and flat["momentum_buffer"] is not None:
            self.momentum_buffer.copy_(flat["momentum_buffer"])


def fused_optimizer(name: str, params, **kwargs) -> _FlatOptimizer:
    """``"adam"`` (L2 decay), ``"adamw"`` or ``"sgd"`` over one flat buffer; kwargs as the classes take."""
    if name == "adam":
        return FusedAdam(params, adamw=False, **kwargs)
    if name == "adamw":
        return FusedAdam(params, adamw=True, **kwargs)
    if name == "sgd":
        return FusedSGD(params, **kwargs)
    raise ValueError(f"fused_optimizer: name={name!r}: must be one of adam, adamw, sgd")
