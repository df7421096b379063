"""StreamingReader and iter_shard on real HDF5 shards: order, resume, padding, errors, hooks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from hpc.data import ShardReadError, StreamingReader, iter_shard, load_manifest, rank_order
from _data_util import collect, make_split, same_batches

COUNTS = [50, 17, 33, 40]  # uneven shards, 140 samples


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = tmp_path_factory.mktemp("reader") / "train"
    make_split(d, COUNTS)
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images") / "train"
    make_split(d, [30, 30, 12], image=True, compression="gzip")
    return d


def small(split, **kw):
    args = dict(rank=0, world_size=1, batch_size=8, seed=5, block_rows=4, shuffle_buffer_mb=20 * 12 / 2**20)
    args.update(kw)
    return StreamingReader(split, **args)


def test_batches_match_the_pure_plan_and_rows(split):
    r = small(split, rank=1, world_size=3, normalize=False)
    batches = collect(r)
    assert len(batches) == r.batches_per_epoch == (140 // 3) // 8
    ids = np.concatenate([b["row_id"] for b in batches])
    expect = rank_order(COUNTS, 4, 3, 1, seed=5, epoch=0, window_samples=r.window_samples)
    assert np.array_equal(ids, expect[:len(ids)])
    for b in batches:  # x[:, 0] encodes the row id: the data really is that row
        assert np.array_equal(b["x"][:, 0], b["row_id"].astype(np.float32))
        assert np.array_equal(b["y"], b["row_id"] % 4)
        assert b["x"].dtype == np.float32 and b["y"].dtype == np.int64 and b["row_id"].dtype == np.int64
        assert np.all(b["weight"] == 1.0)


def test_pad_covers_every_sample_once_across_ranks(split):
    seen, nbatches = [], set()
    for rank in range(3):
        r = small(split, rank=rank, world_size=3, remainder="pad", batch_size=16, normalize=False)
        bs = collect(r)
        nbatches.add(len(bs))
        for b in bs:
            assert len(b["weight"]) == 16
            pad = b["weight"] == 0
            assert np.all(b["row_id"][pad] == -1) and np.all(b["x"][pad] == 0)
            seen.append(b["row_id"][~pad])
    assert nbatches == {3}
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(140))


@pytest.mark.parametrize("prefetch", [0, 3])
def test_exact_resume_at_any_batch(images, prefetch):
    kw = dict(batch_size=8, seed=11, augment="flip,crop=1,rotate=10,noise=0.1", prefetch=prefetch)
    full = collect(small(images, **kw))
    n = len(full)
    assert n == 72 // 8
    for k in sorted({0, 1, n // 2, n - 1, n}):
        a = small(images, **kw)
        it = iter(a)
        for _ in range(k):
            next(it)
        state = a.state_dict()
        it.close()
        b = small(images, **kw)
        b.load_state_dict(state)
        b.set_epoch(0)  # the trainer's loop calls this; it keeps the resumed position
        assert same_batches(collect(b), full[k:]), k
        assert b.state_dict()["epoch"] == 1 and b.state_dict()["batch"] == 0
    # The next epoch is a different order, and reproducible.
    c = small(images, **kw)
    collect(c)
    assert c.state_dict()["epoch"] == 1
    e1 = collect(c)
    assert not same_batches(e1, full)
    d = small(images, **kw)
    d.set_epoch(1)
    assert same_batches(collect(d), e1)


def test_prefetch_thread_matches_inline_and_stops_early(split):
    assert same_batches(collect(small(split, prefetch=0)), collect(small(split, prefetch=2)))
    r = small(split, prefetch=2)
    for i, _ in enumerate(r):
        if i == 2:
            break
    assert r.state_dict()["batch"] == 3


def test_world_size_change_refused_mid_epoch_allowed_at_boundary(split):
    a = small(split, world_size=2)
    it = iter(a)
    next(it)
    state = a.state_dict()
    it.close()
    with pytest.raises(ValueError, match="world_size saved 2 now 4"):
        small(split, world_size=4).load_state_dict(state)
    done = dict(state, batch=state["batches_per_epoch"])  # saved after the last batch of epoch 0
    c = small(split, world_size=4)
    c.load_state_dict(done)
    c.set_epoch(0)
    assert collect(c) == [] and (c.epoch, c.position) == (1, 0)
    state_boundary = dict(state, batch=0, epoch=3)
    b = small(split, world_size=4)
    b.load_state_dict(state_boundary)
    assert b.epoch == 3 and b.position == 0
    with pytest.raises(ValueError, match="another data set"):
        b.load_state_dict(dict(state, manifest_sha256="0" * 64))


def test_normalization_from_manifest_and_explicit(images):
    m = load_manifest(images)
    raw = np.concatenate([b["x"] for b in collect(small(images, normalize=False, remainder="pad"))])
    norm = np.concatenate([b["x"] for b in collect(small(images, normalize=True, remainder="pad"))])
    mean = np.array(m.stats["x"]["mean"], np.float32)[None, :, None, None]
    std = np.array(m.stats["x"]["std"], np.float32)[None, :, None, None]
    real = raw.sum(axis=(1, 2, 3)) != 0  # exclude padding rows
    np.testing.assert_allclose(norm[real], (raw[real] - mean) / std, rtol=1e-5, atol=1e-5)
    given = {"x": {"mean": [1.0], "std": [2.0]}}
    half = np.concatenate([b["x"] for b in collect(small(images, normalize=given, remainder="pad"))])
    np.testing.assert_allclose(half[real], (raw[real] - 1) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown field"):
        small(images, normalize={"nope": {"mean": [0], "std": [1]}})


def test_augment_flip_is_a_flip_and_tabular_rejects_spatial(images, split):
    raw = collect(small(images, normalize=False))
    aug = collect(small(images, normalize=False, augment={"flip": True}))
    for a, b in zip(raw, aug):
        flipped = np.all(b["x"] == a["x"][..., ::-1], axis=(1, 2, 3))
        same = np.all(b["x"] == a["x"], axis=(1, 2, 3))
        assert np.all(flipped | same) and flipped.any() and (~flipped).any()
    with pytest.raises(ValueError, match="image samples"):
        small(split, augment="flip")
    noisy = collect(small(split, normalize=False, augment="noise=0.5"))
    plain = collect(small(split, normalize=False))
    assert 0.2 < np.std(noisy[0]["x"] - plain[0]["x"]) < 1.0
    with pytest.raises(ValueError, match="unknown 'spin'"):
        small(split, augment="spin")


def test_weight_fn_hook_for_bootstrap(split):
    def poisson(row_ids, epoch):  # a bootstrap multiplicity keyed on (member, row id)
        return (row_ids * 2654435761 + epoch) % 3

    bs = collect(small(split, weight_fn=poisson, normalize=False))
    for b in bs:
        assert np.array_equal(b["weight"], ((b["row_id"] * 2654435761) % 3).astype(np.float32))


def test_iter_shard_in_order(split):
    batches = list(iter_shard(split, 2, batch_size=10, normalize=False))
    assert [len(b["row"]) for b in batches] == [10, 10, 10, 3]
    rows = torch.cat([b["row"] for b in batches]).numpy()
    ids = torch.cat([b["row_id"] for b in batches]).numpy()
    assert np.array_equal(rows, np.arange(33)) and np.array_equal(ids, np.arange(67, 100))
    assert np.array_equal(torch.cat([b["x"][:, 0] for b in batches]).numpy(), ids.astype(np.float32))
    assert all(torch.all(b["shard_index"] == 2) for b in batches)
    with pytest.raises(ValueError, match="shard_index 9"):
        next(iter_shard(split, 9, 4))


def _copy(split, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(split, dst)
    return dst


def test_missing_truncated_misschema_fail_at_open(split, tmp_path):
    d = _copy(split, tmp_path)
    (d / "shard-00001.h5").unlink()
    with pytest.raises(ValueError, match=r"shard-00001\.h5: missing"):
        small(d)
    d2 = _copy(split, tmp_path / "b")
    with open(d2 / "shard-00002.h5", "r+b") as f:
        f.truncate(os.path.getsize(d2 / "shard-00002.h5") - 100)
    with pytest.raises(ValueError, match=r"shard-00002\.h5: size .*truncated"):
        small(d2)
    d3 = _copy(split, tmp_path / "c")
    text = (d3 / "manifest.json").read_text().replace('"shape": [\n        3\n      ]', '"shape": [\n        5\n      ]')
    (d3 / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=r"shard-00000\.h5:/x is float32\[3\], manifest says float32\[5\] \(field 'x'\)"):
        small(d3)


def test_mid_epoch_read_failure_names_the_shard(split, tmp_path):
    d = _copy(split, tmp_path)
    r = small(d, shuffle=False, prefetch=2)
    it = iter(r)
    next(it)
    # Damage the last shard after the open checks passed (same size: only a read can notice).
    p = d / "shard-00003.h5"
    p.write_bytes(b"\0" * os.path.getsize(p))
    with pytest.raises(ShardReadError, match=r"shard-00003\.h5"):
        for _ in it:
            pass


def test_scatter_reads_equal_hdf5_reads(tmp_path):
    # Rows of 3 KB take the os.preadv scatter path; direct_io=False reads the same through HDF5.
    from hpc.data import SynthConfig, WriterConfig, synth
    from hpc.data.assemble import SCATTER_MIN_ROW_BYTES

    synth(SynthConfig(kind="images", samples=700, size=16, chunk=128), tmp_path, split="train=1",
          writer=WriterConfig(samples_per_shard=250))
    assert 3 * 16 * 16 * 4 >= SCATTER_MIN_ROW_BYTES
    kw = dict(batch_size=32, seed=2, shuffle_buffer_mb=0.5, remainder="pad", normalize=True)
    for rank in range(3):
        direct = collect(StreamingReader(tmp_path / "train", rank, 3, **kw))
        hdf5 = collect(StreamingReader(tmp_path / "train", rank, 3, direct_io=False, **kw))
        assert same_batches(direct, hdf5)
    a = StreamingReader(tmp_path / "train", 1, 3, **kw)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    it.close()
    b = StreamingReader(tmp_path / "train", 1, 3, direct_io=False, **kw)
    b.load_state_dict(state)
    assert same_batches(collect(b), collect(StreamingReader(tmp_path / "train", 1, 3, **kw))[3:])


@pytest.mark.parametrize("features", [3, 300])  # 12 B rows: gather path; 1200 B rows: scatter path
def test_held_batches_are_never_overwritten(tmp_path, features):
    d = tmp_path / "t"
    make_split(d, [300, 200], features=features)
    r = small(d, batch_size=16, normalize=False, shuffle_buffer_mb=0.05, prefetch=2)
    held = list(r) + list(r)  # two epochs; tensors kept as handed out (no copies)
    assert len(held) == 2 * (500 // 16)
    for b in held:
        assert torch.equal(b["x"][:, 0], b["row_id"].float())


def test_buffer_pool_reuses_only_dropped_arrays():
    from hpc.data.assemble import BufferPool

    pool = BufferPool(cap=4)
    a = pool.get((4, 2), np.float32)
    b = pool.get((4, 2), np.float32)
    assert a is not b  # `a` is still held
    view = a[1:]
    del a
    c = pool.get((4, 2), np.float32)
    assert c.base is None and view.base is not c  # a view keeps its base alive and busy
    del view, b, c
    d = pool.get((4, 2), np.float32)
    assert any(d is x for x in pool.arrays[((4, 2), np.dtype(np.float32).str)])
