"""Stacking: balanced deterministic folds; out-of-fold predictions never come from a member that saw the row."""

import numpy as np
import pytest

from hpc.data.sampling import fold_of, fold_weights, permute_rows
from hpc.ensemble.stacking import OOFTable


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_permutation_is_a_bijection(n):
    p = permute_rows(11, np.arange(n), n)
    assert sorted(p.tolist()) == list(range(n))


@pytest.mark.parametrize("n,f", [(1000, 5), (1797, 5), (10, 3), (4097, 10)])
def test_folds_balanced_and_deterministic(n, f):
    a = fold_of(3, np.arange(n), n, f)
    counts = np.bincount(a, minlength=f)
    assert counts.max() - counts.min() <= 1
    rng = np.random.default_rng(0)
    perm = rng.permutation(n)
    b = np.empty_like(a)
    for i in range(0, n, 64):  # any batching/order gives the same fold
        b[perm[i:i + 64]] = fold_of(3, perm[i:i + 64], n, f)
    assert np.array_equal(a, b)
    if n >= 1000:
        assert not np.array_equal(a, fold_of(4, np.arange(n), n, f))
        # not the identity modulo f: a class-sorted split would otherwise give pure folds
        assert np.mean(a == np.arange(n) % f) < 0.5


def test_no_leakage_with_memorizing_members():
    """Each member memorizes its training rows; out-of-fold it can only answer 'unseen' (-1)."""
    n, folds, seed = 600, 4, 9
    rows = np.arange(n)
    labels = (rows * 7) % 10
    table = OOFTable(seed, n, folds, width=1)
    for holdout in range(folds):
        w = fold_weights(seed, rows, n, folds, holdout)
        seen = {int(r): int(labels[r]) for r in rows[w > 0]}    # "training" = the rows with weight > 0
        held = rows[fold_of(seed, rows, n, folds) == holdout]
        preds = np.array([seen.get(int(r), -1) for r in held], dtype=np.float32)
        table.add(holdout, held, preds)
    assert table.complete()
    assert (table.values[:, 0] == -1).all()            # no OOF prediction came from a member that saw its row
    for holdout in range(folds):                         # and each row's source is the member that held it out
        assert (fold_of(seed, rows[table.source == holdout], n, folds) == holdout).all()


def test_oof_refuses_rows_the_member_trained_on():
    n, folds = 100, 5
    table = OOFTable(0, n, folds, width=2)
    f = fold_of(0, np.arange(n), n, folds)
    trained_on = np.flatnonzero(f != 1)[:3]
    with pytest.raises(ValueError, match="leakage"):
        table.add(1, trained_on, np.zeros((3, 2)))
    held = np.flatnonzero(f == 1)
    table.add(1, held, np.ones((len(held), 2)))
    with pytest.raises(ValueError, match="already"):
        table.add(1, held[:1], np.ones((1, 2)))
    assert not table.complete() and len(table.missing()) == n - len(held)


def test_bad_arguments():
    with pytest.raises(ValueError, match="folds >= 2"):
        fold_of(0, np.arange(3), 3, 1)
    with pytest.raises(ValueError, match="outside"):
        fold_of(0, np.array([5]), 5, 2)
    with pytest.raises(ValueError, match="holdout"):
        fold_weights(0, np.arange(3), 3, 2, 2)
