"""Bootstrap multiplicities computed while streaming: no copy of the data, no shared state.

Bagging trains member m on a bootstrap resample of the training split. Drawing N rows with
replacement gives each row a multiplicity that is Binomial(N, 1/N), i.e. Poisson(1) in the limit
N -> inf ("Poisson bootstrap", Oza & Russell 2001). Drawing each row's count independently from
Poisson(1) keyed by (member seed, global row id) makes the count a pure function of the row:
every rank, shard assignment, shuffle order, epoch and resume sees the same count for the same
row, and nothing is materialized. The trainer multiplies each sample's loss by its count, which
for a summed loss is exactly training on the resample (a row drawn c times contributes c copies
of its gradient); rows with count 0 (~e^-1 = 36.8%) are "out of bag".

The RNG is counter-based: splitmix64's finalizer (a bijection on 64 bits with full avalanche)
applied to the row id mixed with a per-seed key, then inverse-CDF Poisson(1) on the top 53 bits.
Cost: a handful of uint64 multiplies per row, vectorized; ~10 ns per row in numpy.
"""

from __future__ import annotations

import math

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1
# Poisson(1) CDF up to k = 19; P(K >= 20) = 4e-19 < 2^-53, below the uniform's resolution, so
# capping there changes no count any 53-bit uniform can produce.
_KMAX = 20
_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(_KMAX)])


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrapping arithmetic is intended)."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _seed_key(seed: int) -> np.uint64:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"bootstrap seed must be an integer, got {seed!r}")
    s = np.array([int(seed) & _MASK64], dtype=np.uint64)
    return _mix64(_mix64(s + _GOLDEN))[0]


def _as_row_ids(row_ids) -> np.ndarray:
    r = np.asarray(row_ids)
    if r.dtype.kind not in "iu":
        raise ValueError(f"row ids must be integers, got dtype {r.dtype}")
    if r.dtype.kind == "i" and r.size and int(r.min()) < 0:
        raise ValueError("row ids must be >= 0 (padding rows carry weight 0, not a negative id)")
    return r.astype(np.uint64, copy=False)


def uniform01(seed: int, row_ids) -> np.ndarray:
    """Uniform [0, 1) doubles, one per row id, a pure function of (seed, row id)."""
    with np.errstate(over="ignore"):
        key = _seed_key(seed)
        x = _mix64((_as_row_ids(row_ids) * _GOLDEN) ^ key)
        x = _mix64(x + key)  # second round: decorrelates seeds whose keys differ in few bits
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def poisson1_counts(seed: int, row_ids) -> np.ndarray:
    """Per-row bootstrap multiplicity ~ Poisson(1), deterministic in (seed, row id); int32."""
    u = uniform01(seed, row_ids)
    return np.searchsorted(_CDF, u, side="right").astype(np.int32)


def bootstrap_weights(seed: int, row_ids, base_weight=None) -> np.ndarray:
    """Per-sample loss weights for a batch: multiplicity x the reader's weight (0 for padding).

    ``row_ids`` is the batch's ``row_id`` field (a numpy array or CPU tensor), ``base_weight`` its
    ``weight`` field; returns float32 so it can replace ``batch["weight"]`` directly.
    """
    w = poisson1_counts(seed, _to_numpy(row_ids)).astype(np.float32)
    if base_weight is not None:
        w *= _to_numpy(base_weight).astype(np.float32, copy=False)
    return w


def out_of_bag(seed: int, row_ids) -> np.ndarray:
    """Boolean mask of the rows member ``seed`` never saw (count 0): its out-of-bag rows."""
    return poisson1_counts(seed, row_ids) == 0


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor; avoids importing torch here
        return a.detach().cpu().numpy()
    return np.asarray(a)
