"""Registered models out of the cluster: one self-contained graph per model (`hpc registry export`).

``export(registry, ref, out, fmt)`` loads a version the way ``hpc infer`` does (checksums first,
promoted versions only unless ``allow_unpromoted``) and writes, into a temporary directory that is
renamed onto ``out`` only when everything below held (so a failure writes nothing):

- the graph (``model.onnx``, ``model.pt`` TorchScript, or ``model.pt2`` torch.export): raw input
  tensors of the dtype and per-sample shape the data manifest records (``x``; ``user``/``item``
  ids for ``mf``), a dynamic batch axis, the training normalization inside, and the outputs
  ``hpc infer`` writes: ``probabilities`` [B, C] and ``prediction`` [B] (int64, argmax) for
  classification, ``prediction`` [B] (float32) for regression/ratings. Ensembles are one graph:
  every member with its own normalization, combined as registered (mean, vote, weighted, stacking);
- ``model.json`` (the registry card), ``signature.json`` (inputs, outputs, verification, sizes),
  ``README.md`` (a model card with a 5-line snippet needing only onnxruntime + numpy, or torch),
  and ``SHA256SUMS`` over every other file;
- with ``quantize="int8"`` (ONNX only) also ``model.int8.onnx`` (onnxruntime.quantization: static
  QDQ for graphs with convolutions, calibrated on training rows; dynamic int8 MatMul/Gather
  otherwise), written only if its accuracy (RMSE) on the test split is within ``max_drop`` of fp32.

Verified, not assumed: the written file is loaded back in its own runtime (onnxruntime,
``torch.jit.load``, ``torch.export.load``) and run on rows of the model's evaluation split (val,
else test, else train; synthetic rows from the training statistics when the data is gone) with
batch sizes N, 1 and 37; it must equal the registry scorer within ``TOLERANCE``, or ``ExportError``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from hpc import __version__
from hpc.data.manifest import INPUT_FIELDS, TASK_FIELDS, check_schema, load_manifest
from hpc.data.reader import iter_shard
from hpc.registry.graph import (FORMATS, Graph, input_fields, onnx_opset, quantize_int8, runner, save_graph,
                                singles, stats_view)
from hpc.registry.layout import SUMS, Ref, format_sums
from hpc.registry.scorers import training_stats
from hpc.util.io import atomic_dir, sha256_file

INT8_FILE = "model.int8.onnx"
SIGNATURE = "signature.json"
# Max |exported - registry scorer| over probabilities (classification) or over values scaled by
# max(1, |value|) (regression, ratings): fp32 graphs differ from the eager model only by the order
# of float additions (measured: 0 for TorchScript/pt2, <= 3e-6 for onnxruntime).
TOLERANCE = 1e-5
VERIFY_ROWS = 256
CHECK_BATCHES = (1, 37)       # the dynamic batch axis, on rows of the sample
CALIBRATION_ROWS = 512        # training rows for static int8 calibration
EVAL_ROWS = 20000             # at most this many test rows for the int8 accuracy
MAX_DROP = 1.0                # default: accuracy percentage points (RMSE: percent increase)


class ExportError(RuntimeError):
    """The exported graph does not compute what the registry scorer does, or int8 lost too much:
    nothing was written (exit status 1)."""


# ----------------------------------------------------------------------------- data for the checks
def data_dir(scorer: nn.Module) -> Path | None:
    """The training data directory (train/ val/ test/) recorded in the (first member's) card."""
    d = (singles(scorer)[0].card.get("data") or {}).get("dir")
    return Path(d) if d else None


def read_rows(split_dir: Path, schema: dict, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` rows of a split (manifest order), raw, every field in its schema dtype."""
    m = load_manifest(split_dir)
    check_schema(schema, m)
    parts: dict[str, list] = {k: [] for k in schema["fields"]}
    got = 0
    for s in range(len(m.shards)):
        for b in iter_shard(m, s, min(n, 4096), normalize=False):
            for k in parts:
                parts[k].append(b[k].numpy())
            got += len(b["row"])
            if got >= n:
                break
        if got >= n:
            break
    return {k: np.concatenate(v)[:n].astype(schema["fields"][k]["dtype"]) for k, v in parts.items()}


def _split(root: Path | None, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if root is not None and (root / name / "manifest.json").is_file():
            return root / name
    return None


def synthetic_rows(card: dict, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows drawn from the training statistics (ids uniform over their range): for checking a
    graph against the scorer when the training data is no longer there."""
    rng, schema = np.random.default_rng(seed), card["schema"]
    stats = {**(card.get("stats") or {}), **training_stats(card)}
    out = {}
    for k, f in schema["fields"].items():
        shape, dtype = tuple(f["shape"]), np.dtype(f["dtype"])
        if dtype.kind == "f":
            x = rng.standard_normal((n, *shape))
            with contextlib.suppress(KeyError, ValueError, TypeError):  # no (usable) statistics: N(0, 1)
                view = (1, *stats_view(stats[k], shape))
                x = x * np.reshape(stats[k]["std"], view) + np.reshape(stats[k]["mean"], view)
            out[k] = x.astype(dtype)
        else:
            hi = {"user": "num_users", "item": "num_items"}.get(k, "num_classes")
            out[k] = rng.integers(0, int(schema.get(hi) or 2), size=(n, *shape)).astype(dtype)
    return out


def eval_sample(card: dict, root: Path | None, n: int = VERIFY_ROWS) -> tuple[dict, str]:
    """(rows, where they came from): the model's evaluation split, or synthetic rows."""
    split = _split(root, ("val", "test", "train"))
    if split is None:
        return synthetic_rows(card, n), (f"{n} synthetic rows drawn from the training statistics "
                                         f"(no data at {root})")
    rows = read_rows(split, card["schema"], n)
    return rows, f"{len(next(iter(rows.values())))} rows of {split}"


# ----------------------------------------------------------------------------- running graphs
def reference(scorer: nn.Module, rows: dict[str, np.ndarray]) -> np.ndarray:
    """The registry scorer's output on raw rows: probabilities [N, C] or values [N]."""
    with torch.inference_mode():
        return scorer(scorer.prepare({k: torch.from_numpy(v) for k, v in rows.items()})).numpy()


def compare(task: str, ref: np.ndarray, got: list[np.ndarray], tol: float = TOLERANCE) -> tuple[float, int]:
    """(max scaled |got - ref|, predictions that differ where the reference has no near-tie)."""
    if task != "classification":
        diff = np.abs(got[0].astype(np.float64) - ref) / np.maximum(1.0, np.abs(ref))
        return (float(diff.max()) if diff.size else 0.0), 0
    diff = float(np.abs(got[0].astype(np.float64) - ref).max()) if ref.size else 0.0
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    return diff, int(((got[1] != ref.argmax(1)) & clear).sum())


def _rows_of(rows: dict[str, np.ndarray], fields: list[str], n: int | None = None) -> list[np.ndarray]:
    return [np.ascontiguousarray(rows[k][:n]) for k in fields]


def measure(run, task: str, ref: np.ndarray, rows: dict, fields: list[str]) -> list[dict]:
    """The exported graph on the whole sample and on its first 1 and 37 rows (the dynamic batch
    axis) against the scorer's output on the same rows."""
    n, checks = len(ref), []
    for b in (n, *[c for c in CHECK_BATCHES if c < n]):
        diff, wrong = compare(task, ref[:b], run(_rows_of(rows, fields, b)))
        checks.append({"batch": b, "max_abs_diff": diff, "predictions_differ": wrong})
    return checks


def verify(run, task: str, ref: np.ndarray, rows: dict, fields: list[str], log: Callable[[str], None],
           label: str, tol: float = TOLERANCE) -> dict:
    """``measure``, printed; ExportError unless every difference is within ``tol``."""
    checks = measure(run, task, ref, rows, fields)
    for c in checks:
        log(f"  batch {c['batch']:>4}: max abs diff {c['max_abs_diff']:.3g}, "
            f"{c['predictions_differ']} predictions differ")
    worst = max(c["max_abs_diff"] for c in checks)
    wrong = sum(c["predictions_differ"] for c in checks)
    if not worst <= tol or wrong:
        raise ExportError(f"{label}: the exported graph differs from the registry scorer: max abs "
                          f"difference {worst:.3g} (tolerance {tol:g}), {wrong} predictions differ; "
                          "nothing written")
    log(f"  OK: max abs difference {worst:.3g} <= tolerance {tol:g}")
    return {"rows": len(ref), "batches": [c["batch"] for c in checks], "max_abs_diff": worst, "tolerance": tol}


# ----------------------------------------------------------------------------- writing graphs
# ----------------------------------------------------------------------------- int8 accuracy
def _target(task: str) -> str:
    return next(k for k in TASK_FIELDS[task] if k not in INPUT_FIELDS[task])


def metric(task: str, outputs: list[np.ndarray], y: np.ndarray) -> float:
    """Accuracy (classification) or RMSE of an exported graph's outputs against the targets."""
    if task == "classification":
        return float((outputs[1] == y).mean())
    return float(np.sqrt(np.mean((outputs[0].astype(np.float64) - y) ** 2)))


def drop(task: str, fp32: float, int8: float) -> float:
    """What int8 lost: accuracy percentage points, or percent RMSE increase (regression, ratings)."""
    return (fp32 - int8) * 100.0 if task == "classification" else (int8 / max(fp32, 1e-12) - 1.0) * 100.0


def _batched(run, xs: list[np.ndarray], batch: int = 4096) -> list[np.ndarray]:
    parts = [run([x[a:a + batch] for x in xs]) for a in range(0, len(xs[0]), batch)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def _int8(fp32_path: Path, dst: Path, task: str, schema: dict, fields: list[str], root: Path | None,
          max_drop: float, check: Callable[[Any], list[dict]], log: Callable[[str], None]) -> dict:
    test = _split(root, ("test", "val"))
    if test is None:
        raise ValueError(f"--quantize int8: no test (or val) split under {root} to measure the int8 "
                         "model's accuracy on; pass --data DIR (the directory with train/ val/ test/)")
    train = _split(root, ("train",))
    calib = None
    if train is not None:
        rows = read_rows(train, schema, CALIBRATION_ROWS)
        calib = [{k: rows[k][a:a + 64] for k in fields} for a in range(0, len(rows[fields[0]]), 64)]
    how = quantize_int8(fp32_path, dst, calib)
    checks = check(runner("onnx", dst))  # it runs, on any batch size; how far from fp32 is informative
    rows = read_rows(test, schema, EVAL_ROWS)
    y = rows[_target(task)]
    xs = _rows_of(rows, fields)
    m32, m8 = (metric(task, _batched(runner("onnx", p), xs), y) for p in (fp32_path, dst))
    lost = drop(task, m32, m8)
    name = "accuracy" if task == "classification" else "RMSE"
    unit = "percentage points" if task == "classification" else "% RMSE increase"
    s32, s8 = fp32_path.stat().st_size, dst.stat().st_size
    log(f"int8: {how}")
    log(f"  | model | file | bytes | {name} on {len(y)} rows of {test} |")
    log(f"  | fp32 | {fp32_path.name} | {s32:,} | {m32:.4f} |")
    log(f"  | int8 | {dst.name} | {s8:,} ({s32 / max(s8, 1):.2f}x smaller) | {m8:.4f} |")
    log(f"  drop {lost:.2f} {unit} (max {max_drop:g})")
    if lost > max_drop:
        raise ExportError(f"--quantize int8: {name} {m32:.4f} (fp32) -> {m8:.4f} (int8) on {len(y)} rows of "
                          f"{test}: a drop of {lost:.2f} {unit} exceeds --max-drop {max_drop:g}; nothing written")
    return {"file": dst.name, "method": how, "bytes": s8, "fp32_bytes": s32, "metric": name.lower(),
            "fp32": m32, "int8": m8, "drop": lost, "drop_unit": unit, "max_drop": max_drop,
            "eval_rows": len(y), "eval_split": str(test),
            "max_abs_diff_vs_scorer": max(c["max_abs_diff"] for c in checks)}


# ----------------------------------------------------------------------------- the export
def _spec(name: str, dtype: str, shape) -> dict:
    return {"name": name, "dtype": dtype, "shape": ["batch", *shape]}


def signature(card: dict, fmt: str, fields: list[str]) -> dict:
    task, schema = card["task"], card["schema"]
    outs = ([_spec("probabilities", "float32", [schema["num_classes"]]), _spec("prediction", "int64", [])]
            if task == "classification" else [_spec("prediction", "float32", [])])
    return {"format": fmt, "file": FORMATS[fmt], "task": task,
            "model": {"name": card["name"], "version": card["version"], "kind": card["kind"],
                      "family": (card.get("model") or {}).get("family", "ensemble"),
                      "model_json_sha256": card["sha256"]},
            "inputs": [_spec(k, schema["fields"][k]["dtype"], schema["fields"][k]["shape"]) for k in fields],
            "outputs": outs,
            "normalization": "inside the graph: (x - mean) / std with the training statistics of "
                             "model.json normalization.stats (a std of 0 divides by 1); feed raw rows",
            **({"classes": schema["num_classes"]} if task == "classification" else {})}


@contextlib.contextmanager
def _staged(out: Path, overwrite: bool):
    """A temporary directory renamed onto ``out`` on success (an earlier export replaced only
    with ``overwrite``); on any exception nothing is left behind."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        with atomic_dir(out) as tmp:
            yield tmp
        return
    if not overwrite:
        raise ValueError(f"{out}: exists; pass --overwrite to replace an earlier export")
    if not (out / SIGNATURE).is_file():
        raise ValueError(f"{out}: exists and is not an export directory (no {SIGNATURE}); choose another --out")
    new, old = (out.with_name(f".{out.name}.{k}-{os.getpid()}") for k in ("new", "old"))
    with atomic_dir(new) as tmp:
        yield tmp
    os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _check_args(fmt: str, quantize: str | None, opset: int | None, max_drop: float) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: valid are {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize {quantize!r}: valid is int8")
    if quantize and fmt != "onnx":
        raise ValueError(f"--quantize int8 needs --format onnx (onnxruntime.quantization); {fmt} graphs "
                         "are written in fp32")
    if opset is not None and fmt != "onnx":
        raise ValueError(f"--opset is for --format onnx, not {fmt}")
    if not max_drop >= 0:
        raise ValueError(f"--max-drop {max_drop}: must be >= 0")


def export(registry, ref: str, out: str | os.PathLike, fmt: str = "onnx", quantize: str | None = None,
           opset: int | None = None, max_drop: float = MAX_DROP, data: str | os.PathLike | None = None,
           allow_unpromoted: bool = False, overwrite: bool = False,
           log: Callable[[str], None] = print) -> dict:
    """Export ``ref`` to ``out`` (see the module docstring); returns the signature written."""
    _check_args(fmt, quantize, opset, max_drop)
    out = Path(out)
    scorer, card = registry.load_scorer(ref, allow_unpromoted)  # verified, as hpc infer loads
    label = f"{card['name']}@{card['version']}"
    root = Path(data) if data else data_dir(scorer)
    rows, where = eval_sample(card, root)
    fields = input_fields(scorer, card, rows)
    graph = Graph(scorer, fields).eval()
    ref_out = reference(scorer, rows)
    sig = signature(card, fmt, fields)
    with _staged(out, overwrite) as tmp:
        path = tmp / FORMATS[fmt]
        t0 = time.perf_counter()
        example = [np.concatenate([x, x])[:8] for x in _rows_of(rows, fields)]  # >= 2 rows: batch stays dynamic
        try:
            save_graph(graph, fmt, example, path, card["task"], opset)
        except ValueError:
            raise
        except Exception as e:  # the exporters raise many types; name the model, format and cause
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"{label}: cannot be exported as {fmt}: {type(e).__name__}: {first[:300]}") from None
        log(f"{label}: wrote {path.name} ({path.stat().st_size:,} bytes) in {time.perf_counter() - t0:.1f} s; "
            f"verifying against the registry scorer on {where}")
        sig["verification"] = dict(verify(runner(fmt, path), card["task"], ref_out, rows, fields, log, label),
                                   data=where, runtime=_runtime(fmt))
        sig["opset"] = onnx_opset(path) if fmt == "onnx" else None
        if quantize:
            sig["int8"] = _int8(path, tmp / INT8_FILE, card["task"], card["schema"], fields, root, max_drop,
                                lambda run: measure(run, card["task"], ref_out, rows, fields), log)
        sig.update(sha256=sha256_file(path), bytes=path.stat().st_size,
                   exported={"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hpc": __version__,
                             "from": str(registry.version_dir(Ref(card["name"], card["version"])).resolve()),
                             **_installed("torch", "onnx", "onnxruntime")})
        (tmp / "model.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / SIGNATURE).write_text(json.dumps(sig, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(readme(card, sig))
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / SUMS).write_text(format_sums({f: sha256_file(tmp / f) for f in files}))
    log(f"{out}: {', '.join(files + [SUMS])}")
    return sig


def _installed(*packages: str) -> dict[str, str]:
    out = {}
    for pkg in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _runtime(fmt: str) -> str:
    if fmt == "onnx":
        return f"onnxruntime {_installed('onnxruntime').get('onnxruntime')}"
    return f"{'torch.jit.load' if fmt == 'torchscript' else 'torch.export.load'} (torch {torch.__version__})"


# ----------------------------------------------------------------------------- README.md
def _example(spec: dict) -> str:
    shape = ", ".join(["3", *map(str, spec["shape"][1:])])
    return f"np.zeros(({shape}{',' if len(spec['shape']) == 1 else ''}), np.{spec['dtype']})"


def snippet(sig: dict) -> str:
    """Five lines that load and run the export: onnxruntime + numpy only (or torch for its formats)."""
    feed = "{" + ", ".join(f'"{s["name"]}": {_example(s)}' for s in sig["inputs"]) + "}"
    outs = ", ".join(o["name"] for o in sig["outputs"])  # onnxruntime: always a list; torch: a tensor or a tuple
    if sig["format"] == "onnx":
        outs += "," if len(sig["outputs"]) == 1 else ""
        return "\n".join(["import numpy as np, onnxruntime as ort",
                          f'session = ort.InferenceSession("{sig["file"]}")',
                          f"feed = {feed}  # 3 raw rows",
                          f"{outs} = session.run(None, feed)",
                          "print(prediction)"])
    load = (f'torch.jit.load("{sig["file"]}")' if sig["format"] == "torchscript"
            else f'torch.export.load("{sig["file"]}").module()')
    return "\n".join(["import numpy as np, torch",
                      f"model = {load}",
                      f"feed = {feed}  # 3 raw rows",
                      f"{outs} = model(*(torch.from_numpy(v) for v in feed.values()))",
                      "print(prediction)"])


def readme(card: dict, sig: dict) -> str:
    metrics = card.get("metrics") or {}
    test = metrics.get("test") or {}
    test = test.get("ensemble", test)  # an ensemble's own metrics, beside its members'
    headline = ", ".join(f"{k} {v:.4g}" for k, v in test.items() if k in ("accuracy", "rmse", "auc", "top5"))
    io_lines = [f"- {kind} `{s['name']}`: {s['dtype']} [{', '.join(map(str, s['shape']))}]"
                for kind, specs in (("input", sig["inputs"]), ("output", sig["outputs"])) for s in specs]
    v = sig["verification"]
    int8 = sig.get("int8")
    lines = [
        f"# {sig['model']['name']}@{sig['model']['version']}: {sig['model']['family']} ({sig['task']})",
        "",
        f"Exported from the hpc model registry as `{sig['file']}` ({sig['format']}); nothing here needs hpc.",
        f"Test metrics at training: {headline or 'none recorded'}. The full model card is `model.json`; "
        "inputs and outputs with shapes are in `signature.json`; `SHA256SUMS` checks every file "
        "(`sha256sum -c SHA256SUMS`).",
        "",
        *io_lines,
        "",
        "Feed raw rows, as in the training data: the graph normalizes them with the training statistics "
        "(model.json `normalization.stats`). `batch` is any size."
        + (" `prediction` is the argmax of `probabilities` (ties: the lower class)."
           if sig["task"] == "classification" else ""),
        "",
        "```python",
        snippet(sig),
        "```",
        "",
        f"Verified at export: equal to the registry's scorer within {v['tolerance']:g} (max abs difference "
        f"{v['max_abs_diff']:.3g}) on {v['data']}, batch sizes {', '.join(map(str, v['batches']))}, "
        f"with {v['runtime']}.",
    ]
    if int8:
        lines += ["", f"`{int8['file']}`: the same inputs and outputs with int8 weights ({int8['method']}); "
                  f"{int8['bytes']:,} bytes vs {int8['fp32_bytes']:,}; {int8['metric']} {int8['int8']:.4f} vs "
                  f"{int8['fp32']:.4f} (fp32) on {int8['eval_rows']} test rows."]
    return "\n".join(lines) + "\n"
