"""assign_buckets (pure): every tensor once, size caps, one kind per bucket, greedy, fill order."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc.dist.buckets import assign_buckets


def check_invariants(sizes, cap, keys=None):
    buckets = assign_buckets(sizes, cap, keys)
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(sizes))), "every tensor in exactly one bucket"
    key = (lambda i: None) if keys is None else keys.__getitem__
    last_by_key = {}
    fill_positions = []
    for b in buckets:
        assert b, "no empty bucket"
        assert len({key(i) for i in b}) == 1, "one dtype/device per bucket"
        assert b == sorted(b, reverse=True), "reverse registration order inside a bucket"
        total = sum(sizes[i] for i in b)
        assert total <= cap or len(b) == 1, "cap exceeded only by a lone oversized tensor"
        k = key(b[0])
        if k in last_by_key:
            prev = last_by_key[k]
            assert prev[-1] > b[0], "buckets of one kind follow reverse registration order"
            # greedy: the previous bucket was closed because this one's first tensor did not fit
            assert sum(sizes[i] for i in prev) + sizes[b[0]] > cap
        last_by_key[k] = b
        fill_positions.append(len(sizes) - 1 - b[-1])
    assert fill_positions == sorted(fill_positions), "buckets returned in the order they fill up"
    return buckets


def test_small_example():
    # sizes in registration order; backward produces 5, 4, ... first
    assert assign_buckets([4, 4, 4, 4, 10, 1], 8) == [[5], [4], [3, 2], [1, 0]]
    assert assign_buckets([], 8) == []
    assert assign_buckets([3, 3, 3], 100) == [[2, 1, 0]]


def test_keys_keep_kinds_apart():
    assert assign_buckets([4, 4, 4, 4], 8, keys=["f32", "f16", "f32", "f16"]) == [[3, 1], [2, 0]]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        assign_buckets([1], 0)
    with pytest.raises(ValueError, match="negative"):
        assign_buckets([1, -1], 4)
    with pytest.raises(ValueError, match="keys"):
        assign_buckets([1, 2], 4, keys=["a"])


def test_at_scale_model_like():
    # 100k tensors (a large transformer has ~1-10k): lognormal sizes, two dtypes, 25 MB buckets.
    rng = random.Random(0)
    sizes = [int(rng.lognormvariate(10, 3)) for _ in range(100_000)]
    keys = [rng.choice(["f32", "bf16"]) for _ in sizes]
    cap = 25 << 20
    buckets = check_invariants(sizes, cap, keys)
    # Greedy packing: every bucket but the last of each kind is more than half full, or was closed
    # by a tensor larger than the remaining room; overall no more than 2x the lower bound.
    lower = sum((sum(s for s, k in zip(sizes, keys) if k == kk) + cap - 1) // cap for kk in ("f32", "bf16"))
    oversized = sum(s > cap for s in sizes)
    assert len(buckets) <= 2 * lower + oversized + 2


def test_deterministic():
    rng = random.Random(1)
    sizes = [rng.randrange(1, 10_000) for _ in range(5000)]
    assert assign_buckets(sizes, 50_000) == assign_buckets(list(sizes), 50_000)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=60), st.integers(1, 3000),
       st.lists(st.sampled_from("abc"), min_size=60, max_size=60))
def test_invariants_property(sizes, cap, keys):
    check_invariants(sizes, cap, keys[:len(sizes)])
    check_invariants(sizes, cap)
