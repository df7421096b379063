"""The exported function as an ``nn.Module``, and writing and running its files.

``Graph(scorer, fields)`` is what ``hpc registry export`` writes (``export.py``): raw input tensors,
positional in ``fields`` order, with a batch axis of any size -> ``(probabilities, prediction)`` for
classification or ``prediction`` for regression/ratings, exactly what ``hpc infer`` writes. It holds
the registry scorer's own modules: the family model, called with the dict it expects, after
``Normalize`` (the training normalization as graph ops), then ``probabilities``; an ensemble's
members each with their own normalization, combined as registered.

``save_graph`` writes it as ONNX (``torch.onnx.export``, dynamo), TorchScript (``torch.jit.trace``:
the models' Python control flow depends only on shapes fixed at registration) or torch.export
(``.pt2``); ``runner`` loads a written file in its own runtime (onnxruntime, ``torch.jit.load``,
``torch.export.load``); ``quantize_int8`` writes an int8 ONNX graph with onnxruntime.quantization.
onnx, onnxruntime and onnxscript are optional (the ``[export]`` extra) and imported where used.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpc.data.manifest import INPUT_FIELDS
from hpc.models.combine import combine
from hpc.registry.scorers import Ensemble, Single, probabilities, training_stats

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt", "pt2": "model.pt2"}
REQUIRES = "pip install onnx onnxruntime onnxscript (the [export] extra)"


def stats_view(stats: dict, shape: tuple[int, ...]) -> tuple[int, ...]:
    """How a field's per-feature or per-channel statistics broadcast over one sample."""
    per = stats.get("per") or ("channel" if len(shape) >= 2 else "feature")
    if per == "channel" and len(shape) >= 2:
        return (len(stats["mean"]),) + (1,) * (len(shape) - 1)
    return tuple(shape)


class Normalize(nn.Module):
    """``hpc.data.normalize.normalizer`` of one field as graph ops: ``(x - mean) * (1 / std)`` in
    float32, per feature or per channel (axis 0 of an image), a std of 0 dividing by 1."""

    def __init__(self, stats: dict, shape: tuple[int, ...]):
        super().__init__()
        view = stats_view(stats, shape)
        mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
        std = np.where(std > 0, std, 1.0).astype(np.float32)
        self.register_buffer("mean", torch.from_numpy(mean.reshape(view)))
        self.register_buffer("inv", torch.from_numpy((1.0 / std).astype(np.float32).reshape(view)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) - self.mean) * self.inv


class _Member(nn.Module):
    """One registered model: raw fields -> what batch inference reports (``Single``'s function)."""

    def __init__(self, scorer: Single):
        super().__init__()
        self.model, self.task = scorer.model, scorer.task
        shapes = {k: tuple(v["shape"]) for k, v in scorer.card["schema"]["fields"].items()}
        self.norm = nn.ModuleDict({k: Normalize(st, shapes[k]) for k, st in training_stats(scorer.card).items()
                                   if k in shapes})

    def forward(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: self.norm[k](v) if k in self.norm else v for k, v in raw.items()}
        return probabilities(self.task, self.model(batch))


class _Combined(nn.Module):
    """A registered ensemble: its members (each with its own normalization) combined as
    ``hpc.models.combine.combine`` does (``Ensemble``'s function)."""

    def __init__(self, scorer: Ensemble):
        super().__init__()
        self.members = nn.ModuleList(_core(m) for m in scorer.members)
        c = scorer.combiner
        self.task, self.method, self.weights, self.groups = c.task, c.method, c.weights, c.groups
        self.meta_model = c.meta  # not `meta`: torch.export cannot unflatten a submodule of that name
        w = torch.tensor(list(c.weights) if c.weights is not None else [1.0] * len(self.members))
        self.vote = c.method == "vote" or (c.method == "weighted" and c.task == "classification")
        self.vote_weights, self.vote_total = [float(v) for v in w], float(w.sum())

    def forward(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        outs = [m(raw) for m in self.members]
        if not self.vote:
            return combine(self.task, self.method, outs, self.weights, self.groups, self.meta_model)
        # combine()'s vote with its total computed here: `float(w.sum())` inside a graph is a
        # data-dependent read that torch.export refuses.
        votes = sum(wk * F.one_hot(o.argmax(-1), o.shape[-1]).float() for wk, o in zip(self.vote_weights, outs))
        return votes / self.vote_total if self.vote_total > 0 else votes


def _core(scorer: nn.Module) -> nn.Module:
    return _Combined(scorer) if isinstance(scorer, Ensemble) else _Member(scorer)


class Graph(nn.Module):
    """What is exported: raw input tensors, positional in ``fields`` order -> ``(probabilities,
    prediction)`` (classification) or ``prediction`` (regression, ratings), as ``hpc infer`` writes."""

    def __init__(self, scorer: nn.Module, fields: list[str]):
        super().__init__()
        self.core, self.fields = _core(scorer), tuple(fields)
        self.classify = scorer.task == "classification"

    def forward(self, *inputs: torch.Tensor):
        out = self.core(dict(zip(self.fields, inputs)))
        return (out, out.argmax(-1)) if self.classify else out


def output_names(task: str) -> list[str]:
    return ["probabilities", "prediction"] if task == "classification" else ["prediction"]


class _Reads(dict):
    """A batch that records which fields a model reads."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def singles(scorer: nn.Module) -> list[Single]:
    return [s for m in scorer.members for s in singles(m)] if isinstance(scorer, Ensemble) else [scorer]


def input_fields(scorer: nn.Module, card: dict, sample: dict[str, np.ndarray]) -> list[str]:
    """The fields the model(s) read: the graph's inputs, in the data layer's order of model inputs
    (``hpc.data.manifest.INPUT_FIELDS``: ``user, item``), then the schema's."""
    read: set[str] = set()
    with torch.no_grad():
        for s in singles(scorer):
            batch = _Reads(s.prepare({k: torch.from_numpy(v[:2]) for k, v in sample.items()}))
            s.model(batch)
            read |= batch.read
    known = INPUT_FIELDS.get(scorer.task, ())  # their order first (user, item); then the schema's
    order = [*known, *(k for k in card["schema"]["fields"] if k not in known)]
    return [k for k in order if k in read] or [k for k in known if k in card["schema"]["fields"]]


def runner(fmt: str, path: Path) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """Load an exported file in its own runtime: inputs (numpy, ``fields`` order) -> outputs."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort  # lazy: optional ([export] extra), and only export needs it
        except ImportError:
            raise ValueError(f"--format onnx needs onnxruntime: {REQUIRES}") from None

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        return lambda xs: sess.run(None, dict(zip(names, xs)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* are deprecated in favour of torch.export
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()

    def run(xs: list[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(x) for x in xs])
        return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]

    return run


@contextlib.contextmanager
def _quiet():
    """The exporters print progress, deprecation warnings and a torchvision notice; keep the
    command's output to what it says itself."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def save_graph(graph: Graph, fmt: str, example: list[np.ndarray], path: Path, task: str,
               opset: int | None = None) -> None:
    """Write ``graph`` as ``fmt`` with a dynamic batch axis (``example``: >= 2 rows per input)."""
    args = tuple(torch.from_numpy(x) for x in example)
    batch = torch.export.Dim("batch", min=1)
    dims = (tuple({0: batch} for _ in args),)  # the one *inputs argument: a tuple of per-input specs
    with _quiet(), torch.no_grad():
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(graph, args, check_trace=False), str(path))
        elif fmt == "pt2":
            torch.export.save(torch.export.export(graph, args, dynamic_shapes=dims), str(path))
        else:
            if importlib.util.find_spec("onnxscript") is None:  # torch.onnx.export(dynamo=True) needs it
                raise ValueError(f"--format onnx needs onnx, onnxscript and onnxruntime: {REQUIRES}")
            torch.onnx.export(graph, args, str(path), dynamo=True, input_names=list(graph.fields),
                              output_names=output_names(task), dynamic_shapes=dims, opset_version=opset,
                              external_data=False)


def onnx_opset(path: Path) -> int | None:
    import onnx  # lazy: optional ([export] extra)

    return next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx")), None)


def _has_conv(path: Path) -> bool:
    import onnx  # lazy: optional ([export] extra)

    return any(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)


def quantize_int8(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]] | None) -> str:
    """int8 weights with onnxruntime.quantization; returns how. Graphs with convolutions: static
    QDQ (Conv and MatMul, per channel) calibrated on ``calibration``; otherwise, or when static
    quantization fails, dynamic (weights int8, activations quantized per batch at run time)."""
    try:
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                              quantize_static)
    except ImportError:
        raise ValueError(f"--quantize int8 needs onnxruntime: {REQUIRES}") from None
    note = ""
    if _has_conv(src):
        if not calibration:
            note = "; static skipped: no training rows to calibrate on"
        else:
            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = iter(calibration)

                def get_next(self):
                    return next(self.it, None)

            try:
                with _quiet():
                    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
                                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
                rows = sum(len(next(iter(b.values()))) for b in calibration)
                return f"static (QDQ Conv+MatMul, per channel, calibrated on {rows} training rows)"
            except Exception as e:  # onnxruntime raises many types; fall back, saying why
                note = f"; static failed ({type(e).__name__}: {str(e)[:120]})"
    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return "dynamic (int8 weights of MatMul/Conv/Gather)" + note
