"""Per-row sampling computed while streaming: bootstrap multiplicities and cross-validation folds.

No copy of the data, no shared state: both are pure functions of (seed, global row id).

Bootstrap (bagging).

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

Folds (stacking). Fold of a row = (a seeded pseudo-random permutation of [0, N) applied to its row
id) mod F. The permutation is a 4-round Feistel network on the next even power of two >= N with
cycle walking (re-apply until the value falls inside [0, N)), so it is a bijection of [0, N): folds
are exactly balanced (sizes differ by at most 1), random-looking whatever the row order (sorted by
class, say), and computed per row with no table, so the reader can evaluate it while streaming,
like the bootstrap counts. Cost: O(1) per row (cycle walking averages < 4 passes because the domain
is < 4N).
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
_ROUNDS = 4  # Feistel rounds of the fold permutation


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
    w = (fold_of(seed, _to_numpy(row_ids), num_rows, folds) != holdout).astype(np.float32)
    if base_weight is not None:
        w *= _to_numpy(base_weight).astype(np.float32, copy=False)
    return w
