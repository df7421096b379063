"""Pure partition / shuffle / batching arithmetic at simulated cluster scale (no I/O)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc.data.partition import assign_shards, batches_per_epoch, rank_bounds
from hpc.data.shuffle import cut, epoch_stream, rank_order, shard_blocks
from hpc.data.sources import parse_split, split_labels


def uneven_counts(n_shards: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(500, 1500, n_shards).tolist()


def test_assign_shards_64_ranks_1000_shards_balanced_and_exact():
    counts = uneven_counts(1000)
    parts = assign_shards(counts, 64)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(1000))
    loads = [sum(counts[i] for i in p) for p in parts]
    # LPT guarantee: the spread is at most the largest shard.
    assert max(loads) - min(loads) <= max(counts)
    assert max(loads) / (sum(counts) / 64) < 1.05
    assert assign_shards(counts, 64) == parts


def test_assign_shards_fewer_shards_than_ranks_and_bad_world():
    assert assign_shards([5, 9], 4) == [[1], [0], [], []]
    with pytest.raises(ValueError, match="world_size"):
        assign_shards([1], 0)


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_sample_once_per_epoch_64x1000(shuffle):
    counts = uneven_counts(1000, seed=1)
    total = sum(counts)
    orders = [rank_order(counts, 97, 64, r, seed=3, epoch=5, window_samples=4000, shuffle=shuffle)
              for r in range(64)]
    sizes = [len(o) for o in orders]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == total
    allids = np.concatenate(orders)
    assert np.array_equal(np.sort(allids), np.arange(total))
    if not shuffle:
        assert np.array_equal(allids, np.arange(total))
    # Locality: a rank touches few shards (its piece of the stream), not all of them.
    offsets = np.cumsum(counts)
    touched = len(np.unique(np.searchsorted(offsets, orders[10], side="right")))
    assert touched <= total / 64 / min(counts) + 2


def test_order_deterministic_and_changes_with_epoch_and_seed():
    counts = uneven_counts(50)
    a = rank_order(counts, 64, 4, 1, seed=0, epoch=0, window_samples=2000)
    assert np.array_equal(a, rank_order(counts, 64, 4, 1, seed=0, epoch=0, window_samples=2000))
    assert not np.array_equal(a, rank_order(counts, 64, 4, 1, seed=0, epoch=1, window_samples=2000))
    assert not np.array_equal(a, rank_order(counts, 64, 4, 1, seed=1, epoch=0, window_samples=2000))
    # Rank 1 gets different samples in different epochs (shards move between ranks).
    b = rank_order(counts, 64, 4, 1, seed=0, epoch=1, window_samples=2000)
    assert len(np.intersect1d(a, b)) < 0.9 * len(a)


def test_shuffle_buffer_is_bounded_and_mixes():
    counts = [1000] * 20
    order = rank_order(counts, 50, 1, 0, seed=0, epoch=0, window_samples=500)
    # Within the first window (about 500 samples) the ids come from ~10 blocks spread over shards.
    first = order[:500]
    assert len(np.unique(first // 1000)) >= 5
    assert not np.array_equal(np.sort(first), first)


def test_batches_per_epoch_same_for_all_ranks():
    for total, w, bs in [(1000, 64, 4), (10, 4, 3), (1797, 4, 32), (7, 8, 2)]:
        drop = batches_per_epoch(total, w, bs, "drop")
        pad = batches_per_epoch(total, w, bs, "pad")
        for r in range(w):
            lo, hi = rank_bounds(total, w, r)
            assert drop * bs <= hi - lo <= pad * bs
    with pytest.raises(ValueError, match="remainder"):
        batches_per_epoch(10, 2, 2, "wrap")


def test_cut_splits_boundary_blocks():
    blocks = shard_blocks([10, 5], 4)
    assert blocks.tolist() == [[0, 0, 4], [0, 4, 8], [0, 8, 10], [1, 0, 4], [1, 4, 5]]
    assert cut(blocks, 3, 9).tolist() == [[0, 3, 4], [0, 4, 8], [0, 8, 9]]
    assert cut(blocks, 5, 6).tolist() == [[0, 5, 6]]
    stream = epoch_stream([10, 5], 4, seed=1, epoch=0)
    assert sorted(map(tuple, stream.tolist())) == sorted(map(tuple, blocks.tolist()))


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 300), min_size=1, max_size=12), world=st.integers(1, 9),
       block=st.integers(1, 50), window=st.integers(1, 400), seed=st.integers(0, 2**31), shuffle=st.booleans())
def test_partition_property(counts, world, block, window, seed, shuffle):
    ids = np.concatenate([rank_order(counts, block, world, r, seed, 2, window, shuffle) for r in range(world)]
                         + [np.zeros(0, np.int64)])
    assert np.array_equal(np.sort(ids), np.arange(sum(counts)))


def test_split_labels_exact_over_chunks():
    fr = parse_split("train=0.8,val=0.1,test=0.1")
    rng = np.random.default_rng(0)
    carry = np.zeros(3)
    labels = np.concatenate([split_labels(n, fr, rng, carry) for n in [7, 13, 1, 999, 64]])
    counts = np.bincount(labels, minlength=3)
    assert counts.sum() == 1084
    assert np.all(np.abs(counts - np.array([0.8, 0.1, 0.1]) * 1084) < 1.0 + 1e-9)


@pytest.mark.parametrize("spec", ["train=0.5", "train=0.5,val=0.6", "train", "a=1,a=0", "x=-1,y=2"])
def test_parse_split_errors(spec):
    with pytest.raises(ValueError, match="--split"):
        parse_split(spec)
