"""CuPy kernels for the performance-critical layers (optional: needs CUDA and CuPy).

Model code never calls these directly: it calls ``hpc.models.ops``, which picks this path or the
pure-torch one (``set_kernels``). Importing this package does not import CuPy; the first kernel call
does (``kernels._runtime``). docs/kernels.md has the API, error bounds and the cache directory.
"""

from __future__ import annotations


def bias_act(x, bias, act="relu"):
    from .bias_act_op import bias_act as f

    return f(x, bias, act)


def softmax_cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    from .cross_entropy_op import softmax_cross_entropy as f

    return f(logits, target, ignore_index, label_smoothing, reduction)


def layer_norm(x, weight, bias, eps=1e-5):
    from .layer_norm_op import layer_norm as f

    return f(x, weight, bias, eps)


def embedding(idx, weight, deterministic=False):
    from .embedding_op import embedding as f

    return f(idx, weight, deterministic)


def adam_step(p, g, m, v, **kw):
    from .optim_op import adam_step as f

    return f(p, g, m, v, **kw)


def sgd_step(p, g, buf, **kw):
    from .optim_op import sgd_step as f

    return f(p, g, buf, **kw)


def catalog() -> list[tuple[str, str, list[str]]]:
    """(source file, storage type, template instances) for every module the wrappers compile: what the
    nvcc compile test builds, and what a warm-up can precompile."""
    import importlib

    import torch

    from . import _runtime as rt

    bias_act, cross_entropy, embedding, layer_norm, optim = (
        importlib.import_module(f"{__name__}.{n}_op") for n in ("bias_act", "cross_entropy", "embedding",
                                                                 "layer_norm", "optim"))
    out = []
    for dtype, (ct, _acc, _np) in rt.CTYPES.items():
        vec = rt.vec_width(dtype)
        out.append(("bias_act.cu", ct, bias_act._exprs(ct, vec)))
        out.append(("cross_entropy.cu", ct, cross_entropy._exprs(ct)))
        out.append(("layer_norm.cu", ct, layer_norm._exprs(ct)))
        out.append(("embedding.cu", ct, embedding._exprs(ct, vec)))
        if dtype in (torch.float32, torch.float64):
            out.append(("optim.cu", ct, optim._exprs(ct, vec)))
    return out
