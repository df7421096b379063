"""The trainer hook on the real streaming reader: weights keyed by row id, on any rank layout."""

import numpy as np
import pytest
import torch

from hpc.data.reader import StreamingReader
from hpc.data.sources import shard_source
from hpc.data.writer import WriterConfig
from hpc.data.rowhooks import apply_targets, targets_fn, weight_fn
from hpc.data.sampling import fold_of, poisson1_counts


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    shard_source("sklearn:digits", out, split="train=0.8,test=0.2", seed=0,
                 config=WriterConfig(samples_per_shard=300))
    return out / "train"


def _weights_by_row(split, world, fn, seed=0):
    seen = {}
    for rank in range(world):
        r = StreamingReader(split, rank, world, batch_size=32, seed=seed, remainder="pad", prefetch=0,
                            weight_fn=fn)
        for b in r:
            for row, w in zip(b["row_id"].tolist(), b["weight"].tolist()):
                if row >= 0:
                    assert row not in seen, "a row was read twice in one epoch"
                    seen[row] = w
    return seen


def test_bootstrap_weights_same_on_any_layout(digits):
    n = StreamingReader(digits, prefetch=0).manifest.total_samples
    fn = weight_fn({"kind": "bootstrap", "seed": 4}, n)
    one = _weights_by_row(digits, 1, fn)
    three = _weights_by_row(digits, 3, fn, seed=9)  # other ranks, other shuffle
    assert len(one) == n and one == three
    rows = np.arange(n)
    assert [one[r] for r in rows] == poisson1_counts(4, rows).astype(float).tolist()
    # the reader holds no copy: a different member seed changes the weights, not the data read
    other = _weights_by_row(digits, 1, weight_fn({"kind": "bootstrap", "seed": 5}, n))
    assert other != one and set(other) == set(one)


def test_holdout_and_file_weights(digits, tmp_path):
    n = StreamingReader(digits, prefetch=0).manifest.total_samples
    got = _weights_by_row(digits, 2, weight_fn({"kind": "holdout", "seed": 1, "folds": 4, "fold": 2}, n))
    folds = fold_of(1, np.arange(n), n, 4)
    assert all(got[r] == float(folds[r] != 2) for r in range(n))
    w = np.linspace(0.5, 2.0, n).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    got = _weights_by_row(digits, 2, weight_fn({"kind": "file", "path": str(tmp_path / "w.npy")}, n))
    assert all(got[r] == pytest.approx(float(w[r])) for r in range(n))


def test_bad_specs(digits, tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        weight_fn({"kind": "poisson"}, 10)
    with pytest.raises(ValueError, match="needs key"):
        weight_fn({"kind": "bootstrap"}, 10)
    np.save(tmp_path / "short.npy", np.ones(3, np.float32))
    with pytest.raises(ValueError, match="3 rows|has shape"):
        weight_fn({"kind": "file", "path": str(tmp_path / "short.npy")}, 10)
    np.save(tmp_path / "neg.npy", -np.ones(10, np.float32))
    with pytest.raises(ValueError, match="negative"):
        weight_fn({"kind": "file", "path": str(tmp_path / "neg.npy")}, 10)
    with pytest.raises(ValueError, match="not found"):
        targets_fn(str(tmp_path / "nope.npy"), 10)


def test_apply_targets_keeps_padding(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(10, dtype=np.float32) * 10)
    fn = targets_fn(str(tmp_path / "t.npy"), 10)
    batch = {"row_id": torch.tensor([3, 7, -1]), "rating": torch.tensor([1.0, 2.0, 0.0])}
    out = apply_targets(batch, fn, "rating")
    assert out["rating"].tolist() == [30.0, 70.0, 0.0]
