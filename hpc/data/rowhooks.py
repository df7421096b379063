"""The trainer-facing row hook: per-sample weights and target overrides keyed by global row id.

An ensemble member is an ordinary training run whose config carries two optional keys:

    data:
      sample_weights: {kind: bootstrap, seed: 3}                       # bagging member
                    | {kind: holdout, seed: 0, folds: 5, fold: 2}      # stacking fold member
                    | {kind: file, path: weights.npy}                  # boosting round (SAMME)
      targets_from: residuals.npy                                       # boosting round (regression)

For the *training* split only (never val/test), the trainer passes
``weight_fn(cfg.data.sample_weights, manifest.total_samples)`` to ``StreamingReader(weight_fn=)``
(which multiplies each real row's weight by it) and, when ``targets_from`` is set, calls
``apply_targets(batch, targets_fn(cfg.data.targets_from, n), target_field)`` on each batch.
Weights and targets are functions of ``row_id`` only, so they hold on any number of ranks, any
shuffle, and across resume. Files are ``.npy`` (no pickle), one value per row
of the training split in manifest order; they cost 4 bytes per row of memory (mmap'ed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hpc.data.sampling import bootstrap_weights, fold_weights

KINDS = ("bootstrap", "holdout", "file")


def _load_row_array(path: str | Path, num_rows: int, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: file {p} not found")
    try:
        a = np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{what}: {p} is not a plain .npy array ({e})") from None
    if a.ndim != 1 or len(a) != num_rows:
        raise ValueError(f"{what}: {p} has shape {a.shape}; the training split has {num_rows} rows")
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: {p} holds non-finite values")
    return a


def weight_fn(spec: dict | None, num_rows: int,
              what: str = "data.sample_weights") -> Callable[[np.ndarray, int], np.ndarray] | None:
    """``StreamingReader(weight_fn=...)`` for a ``data.sample_weights`` spec (None: no weighting).

    The reader calls ``fn(row_ids, epoch)`` on a batch's real rows (before padding) and multiplies
    the sample weights by the result; the weights here do not depend on the epoch (a bootstrap
    sample is fixed for the whole run).
    """
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise ValueError(f"{what}: kind must be one of {', '.join(KINDS)}, got {spec!r}")
    kind = spec["kind"]
    try:
        if kind == "bootstrap":
            seed = int(spec["seed"])
            return lambda rows, epoch: bootstrap_weights(seed, rows)
        if kind == "holdout":
            seed, folds, fold = int(spec.get("seed", 0)), int(spec["folds"]), int(spec["fold"])
            fold_weights(seed, np.zeros(1, dtype=np.int64), num_rows, folds, fold)  # validate now
            return lambda rows, epoch: fold_weights(seed, rows, num_rows, folds, fold)
        table = _load_row_array(spec["path"], num_rows, what)
    except KeyError as e:
        raise ValueError(f"{what}: kind {kind} needs key {e}") from None
    if (table < 0).any():
        raise ValueError(f"{what}: {spec['path']} holds negative weights")
    return lambda rows, epoch: np.asarray(table[_np(rows)], dtype=np.float32)


def targets_fn(path: str | None, num_rows: int,
               what: str = "data.targets_from") -> Callable[[np.ndarray], np.ndarray] | None:
    """``fn(row_ids) -> float32 targets`` replacing the target field (None: the data's own)."""
    if not path:
        return None
    table = _load_row_array(path, num_rows, what)
    return lambda rows: np.asarray(table[_np(rows)], dtype=np.float32)


def apply_targets(batch: dict, fn: Callable[[np.ndarray], np.ndarray], field: str) -> dict:
    """Replace ``batch[field]`` by ``fn(row_id)`` on real rows; padding rows (id -1) keep theirs."""
    rows = _np(batch["row_id"])
    real = rows >= 0
    t = batch[field]
    new = t.detach().cpu().numpy().astype(np.float32, copy=True)
    new[real] = fn(rows[real])
    batch[field] = torch.from_numpy(new).to(t.device, t.dtype)
    return batch


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)
