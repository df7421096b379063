"""The Python API: load a registered model and score arrays, tensors or DataFrames; train; infer; export.

::

    import hpc
    m = hpc.load("digits@production")          # verified: checksums first, promoted versions only
    m.predict(x)                               # numpy [N, 64] / torch tensor / DataFrame -> numpy [N]
    m.predict_proba(x)                         # classification: probabilities [N, C]

``hpc/__init__.py`` imports this module on first use (PEP 562), so ``import hpc`` stays cheap.
It sits outside the layered packages (docs/DESIGN.md) and may import any of them.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np
import torch

from hpc.infer import run as infer  # hpc.infer(...) / hpc.train(...): the stage entry points
from hpc.registry import Registry
from hpc.registry.export import export as _export, synthetic_rows
from hpc.registry.graph import input_fields
from hpc.registry.scorers import move
from hpc.train import run as train

__all__ = ["Model", "export", "infer", "load", "train"]


class Model:
    """A verified registered model (or ensemble) scoring rows given as a numpy array, a torch
    tensor, a dict of arrays or a pandas DataFrame (columns by field name), exactly as ``hpc
    infer`` does: the training normalization, the model, then probabilities or values."""

    def __init__(self, scorer: torch.nn.Module, card: dict, device: str = "cpu"):
        self.scorer, self.card, self.device = scorer, card, torch.device(device)
        self.name, self.version, self.task = card["name"], card["version"], scorer.task
        self.fields = card["schema"]["fields"]
        self.inputs = input_fields(scorer, card, synthetic_rows(card, 2))  # what the model reads

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {self.fields[k]['dtype']}{self.fields[k]['shape']}" for k in self.inputs)
        return f"<hpc.Model {self.name}@{self.version} ({self.task}; inputs {shapes})>"

    def predict(self, x: Any, batch_size: int = 4096) -> np.ndarray:
        """Class ids (int64, argmax; ties -> the lower class) or predicted values (float32), [N]."""
        out = self._score(x, batch_size)
        return out.argmax(1).astype(np.int64) if self.task == "classification" else out

    def predict_proba(self, x: Any, batch_size: int = 4096) -> np.ndarray:
        """Class probabilities [N, C] (float32); classification only."""
        if self.task != "classification":
            raise ValueError(f"{self.name}@{self.version} is a {self.task} model: use predict()")
        return self._score(x, batch_size)

    def _score(self, x: Any, batch_size: int) -> np.ndarray:
        cols = self.columns(x)
        n = len(next(iter(cols.values())))
        outs = []
        with torch.inference_mode():
            for a in range(0, n, batch_size):
                prepared = self.scorer.prepare({k: torch.from_numpy(v[a:a + batch_size]) for k, v in cols.items()})
                outs.append(self.scorer(move(prepared, self.device)).cpu().numpy())
        if outs:
            return np.concatenate(outs)
        cls = self.task == "classification"
        return np.zeros((0, self.card["schema"]["num_classes"]) if cls else 0, np.float32)

    def columns(self, x: Any) -> dict[str, np.ndarray]:
        """The model's input fields as arrays [N, *shape] of their schema dtype (ValueError naming
        what is expected when ``x`` does not fit)."""
        if hasattr(x, "columns") and hasattr(x, "to_numpy"):  # a pandas DataFrame (no pandas import)
            raw = {k: self._column(x, k) for k in self.inputs}
        elif isinstance(x, Mapping):
            missing = [k for k in self.inputs if k not in x]
            if missing:
                raise ValueError(f"{self.name}@{self.version}: missing input field(s) {missing}; the model "
                                 f"reads {self.inputs}")
            raw = {k: x[k] for k in self.inputs}
        else:
            a = _array(x)
            if len(self.inputs) == 1:
                raw = {self.inputs[0]: a}
            elif a.ndim == 2 and a.shape[1] == len(self.inputs) and not any(self.fields[k]["shape"]
                                                                             for k in self.inputs):
                raw = {k: a[:, i] for i, k in enumerate(self.inputs)}  # a column per scalar field (user, item)
            else:
                raise ValueError(f"{self.name}@{self.version} reads {self.inputs}: pass a dict or DataFrame with "
                                 f"those fields, or an [N, {len(self.inputs)}] array of them in that order")
        return {k: self._fit(k, _array(v)) for k, v in raw.items()}

    def _column(self, df, k: str) -> np.ndarray:
        shape = self.fields[k]["shape"]
        if k in df.columns:
            col = df[k].to_numpy()
            return np.stack(list(col)) if col.dtype == object and shape else col
        names = [f"{k}_{i}" for i in range(math.prod(shape))] if shape else []
        if names and all(c in df.columns for c in names):
            return df[names].to_numpy()
        want = f"a column {k!r}" + (f" (each cell an array of {shape}) or columns {names[0]}..{names[-1]}"
                                    if shape else "")
        raise ValueError(f"{self.name}@{self.version}: the DataFrame has no input field {k!r}: give {want} "
                         f"(columns: {list(df.columns)[:10]})")

    def _fit(self, k: str, a: np.ndarray) -> np.ndarray:
        spec = self.fields[k]
        shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
        if a.shape == shape and shape:  # a single row
            a = a[None]
        elif a.shape[1:] != shape and not (a.ndim >= 2 and shape and math.prod(a.shape[1:]) == math.prod(shape)):
            raise ValueError(f"{self.name}@{self.version}: input {k!r} has shape {list(a.shape)}; the model "
                             f"expects [N, {', '.join(map(str, shape))}]".replace(", ]", "]") + f" of {dtype}")
        if dtype.kind in "iu" and a.dtype.kind == "f" and not np.array_equal(a, np.round(a)):
            raise ValueError(f"{self.name}@{self.version}: input {k!r} must hold integers ({dtype})")
        a = np.ascontiguousarray(a.reshape(len(a), *shape), dtype=dtype)
        return a if a.flags.writeable else a.copy()  # torch warns on read-only arrays (pandas' views)


def _array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def load(ref: str, root: str | os.PathLike | None = None, allow_unpromoted: bool = False,
         device: str = "cpu") -> Model:
    """A registered model or ensemble, verified (checksums, promoted versions unless
    ``allow_unpromoted``) as ``hpc infer`` loads it; ``root``: the registry (default
    ``$HPC_REGISTRY`` or ./registry)."""
    scorer, card = Registry(root).load_scorer(ref, allow_unpromoted, device)
    return Model(scorer, card, device)


def export(ref: str, out: str | os.PathLike, format: str = "onnx", root: str | os.PathLike | None = None,
           **options) -> dict:
    """``hpc registry export``: ``options`` are ``quantize``, ``opset``, ``max_drop``, ``data``,
    ``allow_unpromoted``, ``overwrite``, ``log`` (see ``hpc.registry.export.export``)."""
    return _export(Registry(root), ref, out, format, **options)
