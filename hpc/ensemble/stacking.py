"""Stacking bookkeeping (pure numpy): out-of-fold tables over the folds of ``hpc.data.sampling``.

A row's cross-validation fold (``fold_of``: a seeded bijection of the row ids mod F, exactly
balanced) is computed by the data layer while streaming, like the bootstrap counts; the member
trained without fold j predicts exactly the rows of fold j, and ``OOFTable`` collects those
out-of-fold predictions as the meta-model's features.
"""

from __future__ import annotations

import numpy as np

from hpc.data.sampling import fold_of


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
