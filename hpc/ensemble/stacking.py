"""Stacking bookkeeping (pure numpy): cross-validation folds from row ids and out-of-fold tables.

Fold of a row = (a seeded pseudo-random permutation of [0, N) applied to its row id) mod F. The
permutation is a 4-round Feistel network on the next even power of two >= N with cycle walking
(re-apply until the value falls inside [0, N)), so it is a bijection of [0, N): folds are exactly
balanced (sizes differ by at most 1), random-looking whatever the row order (sorted by class,
say), and computed per row with no table, so the reader can evaluate it while streaming, like the
bootstrap counts. Cost: O(1) per row (cycle walking averages < 4 passes because the domain is
< 4N).
"""

from __future__ import annotations

import numpy as np

from hpc.ensemble.sampling import _as_row_ids, _mix64, _seed_key

_ROUNDS = 4


def _feistel(x: np.ndarray, half_bits: int, keys: list[np.uint64]) -> np.ndarray:
    mask = np.uint64((1 << half_bits) - 1)
    hb = np.uint64(half_bits)
    left, right = x >> hb, x & mask
    with np.errstate(over="ignore"):
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
    return (left << hb) | right


def permute_rows(seed: int, row_ids, num_rows: int) -> np.ndarray:
    """A seeded bijection of [0, num_rows), evaluated at ``row_ids``; int64."""
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    x = _as_row_ids(row_ids)
    if x.size and int(x.max()) >= num_rows:
        raise ValueError(f"row id {int(x.max())} is outside the split's {num_rows} rows")
    half = max(1, (int(num_rows - 1).bit_length() + 1) // 2)
    base = _seed_key(seed)
    with np.errstate(over="ignore"):
        keys = [_mix64(np.array([base + np.uint64(i + 1)], dtype=np.uint64))[0] for i in range(_ROUNDS)]
    n = np.uint64(num_rows)
    out = _feistel(x, half, keys)
    todo = out >= n
    while todo.any():  # cycle walking: stays a bijection on [0, N)
        out[todo] = _feistel(out[todo], half, keys)
        todo = out >= n
    return out.astype(np.int64)


def fold_of(seed: int, row_ids, num_rows: int, folds: int) -> np.ndarray:
    """Cross-validation fold (0..folds-1) of each row; exactly balanced over [0, num_rows)."""
    if folds < 2:
        raise ValueError(f"stacking needs folds >= 2, got {folds}")
    if folds > num_rows:
        raise ValueError(f"folds ({folds}) cannot exceed the training rows ({num_rows})")
    return (permute_rows(seed, row_ids, num_rows) % folds).astype(np.int32)


def fold_weights(seed: int, row_ids, num_rows: int, folds: int, holdout: int, base_weight=None) -> np.ndarray:
    """Loss weights for the member that holds out fold ``holdout``: 0 on its rows, 1 elsewhere."""
    if not 0 <= holdout < folds:
        raise ValueError(f"holdout fold {holdout} is not in 0..{folds - 1}")
    from hpc.ensemble.sampling import _to_numpy

    w = (fold_of(seed, _to_numpy(row_ids), num_rows, folds) != holdout).astype(np.float32)
    if base_weight is not None:
        w *= _to_numpy(base_weight).astype(np.float32, copy=False)
    return w


class OOFTable:
    """Out-of-fold predictions of one level-0 model family over the training split.

    ``add(holdout, row_ids, preds)`` takes the predictions of the member trained without fold
    ``holdout`` and refuses any row that is not in that fold: such a row was in the member's
    training data, so its prediction would leak the label into the meta-model's features.
    """

    def __init__(self, seed: int, num_rows: int, folds: int, width: int):
        self.seed, self.num_rows, self.folds, self.width = seed, num_rows, folds, width
        self.values = np.zeros((num_rows, width), dtype=np.float32)
        self.source = np.full(num_rows, -1, dtype=np.int32)  # which holdout member filled the row

    def add(self, holdout: int, row_ids, preds) -> None:
        rows = np.asarray(row_ids, dtype=np.int64)
        preds = np.asarray(preds, dtype=np.float32).reshape(len(rows), -1)
        if preds.shape[1] != self.width:
            raise ValueError(f"predictions have width {preds.shape[1]}, the table {self.width}")
        f = fold_of(self.seed, rows, self.num_rows, self.folds)
        if (f != holdout).any():
            bad = int(rows[np.argmax(f != holdout)])
            raise ValueError(f"row {bad} is in fold {int(f[f != holdout][0])}, not held-out fold "
                             f"{holdout}: member {holdout} trained on it (leakage)")
        if (self.source[rows] >= 0).any():
            raise ValueError(f"row {int(rows[np.argmax(self.source[rows] >= 0)])} has an out-of-fold "
                             f"prediction already")
        self.values[rows] = preds
        self.source[rows] = holdout

    def complete(self) -> bool:
        return bool((self.source >= 0).all())

    def missing(self) -> np.ndarray:
        return np.flatnonzero(self.source < 0)
