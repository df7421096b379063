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


# -- the read paths against a straightforward reference read (hpc.data.parallelfill / rawio) -------

def _write_layout(d, dtype, compression, shuffle, chunk_rows, shape=(3, 16, 16), counts=(70, 45, 61), noisy=()):
    """Shards as another lab writes them (h5py, any chunking/filters), indexed in place. Each row
    holds its global id (x[..., 0] = id % 251, x[..., 1] = id // 251) over a compressible pattern;
    shards in ``noisy`` hold random bytes (chunks that gzip/lzf cannot shrink, stored unfiltered)."""
    import h5py

    from hpc.data import index_hdf5

    d.mkdir(parents=True)
    rng = np.random.default_rng(3)
    start = 0
    for i, n in enumerate(counts):
        ids = np.arange(start, start + n)
        size = int(np.prod(shape))
        if i in noisy:
            x = rng.integers(0, 256, size=(n, size))
        else:
            x = (ids[:, None] * 3 + np.arange(size)[None, :] // 7) % 200
        x[:, 0], x[:, 1] = ids % 251, ids // 251
        comp = compression[i % len(compression)] if isinstance(compression, tuple) else compression
        with h5py.File(d / f"part-{i}.h5", "w") as f:
            kw = dict(chunks=None) if chunk_rows is None else dict(chunks=(chunk_rows,) + shape, compression=comp,
                                                                 shuffle=shuffle)
            f.create_dataset("x", data=x.reshape((n,) + shape).astype(dtype), **kw)
            ykw = {} if chunk_rows is None else dict(chunks=(chunk_rows,), compression=comp, shuffle=shuffle)
            f.create_dataset("y", data=ids % 5, dtype="int64", **ykw)
        start += n
    index_hdf5(d, {"x": "/x", "y": "/y"})
    return d


def _reference(reader, normalize):
    """The batches ``reader`` must yield, read the plain way: every row of the split with h5py,
    indexed by the pure plan's row order, padded, converted, normalized."""
    import h5py

    from hpc.data.normalize import input_stats, normalizer
    from hpc.data.shardio import yielded

    m = reader.manifest
    data = {}
    for k in m.fields:
        parts = []
        for i, info in enumerate(m.shards):
            with h5py.File(m.shard_path(i), "r") as f:
                parts.append(f[info.datasets[k]][()])
        data[k] = np.concatenate(parts)
    ids = rank_order(m.sample_counts, reader.block_rows, reader.world_size, reader.rank, reader.seed,
                     reader.epoch, reader.window_samples)
    norm = normalizer(input_stats(m.schema(), m.stats) if normalize else {}, {k: s.shape for k, s in m.fields.items()})
    bs, out = reader.batch_size, []
    for j in range(reader.batches_per_epoch):
        take = ids[j * bs:(j + 1) * bs]
        pad = bs - len(take)
        b = {}
        for k in m.fields:
            v = np.concatenate([data[k][take], np.zeros((pad,) + data[k].shape[1:], data[k].dtype)])
            b[k] = norm(k, yielded(m, k, v).copy())
        b["row_id"] = np.concatenate([take, np.full(pad, -1)]).astype(np.int64)
        b["weight"] = np.concatenate([np.ones(len(take)), np.zeros(pad)]).astype(np.float32)
        out.append(b)
    return out


LAYOUTS = {  # name: (dtype, compression, shuffle, chunk rows, per-sample shape, incompressible shards)
    "float32 raw chunks (scatter)": ("float32", None, False, 20, (3, 16, 16), ()),
    "float32 contiguous (scatter)": ("float32", None, False, None, (3, 16, 16), ()),
    "float32 gzip": ("float32", "gzip", False, 20, (3, 16, 16), ()),
    "float32 gzip + shuffle": ("float32", "gzip", True, 20, (3, 16, 16), ()),
    "uint8 lzf, a shard stored unfiltered": ("uint8", "lzf", False, 20, (3, 16, 16), (2,)),
    "float16 lzf + shuffle": ("float16", "lzf", True, 20, (3, 16, 16), ()),
    "gzip and unfiltered shards mixed": ("float32", ("gzip", None), False, 20, (3, 16, 16), ()),
    "small rows raw (gather)": ("float32", None, False, 20, (5,), ()),
    "small rows gzip + shuffle": ("int16", "gzip", True, 20, (5,), ()),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request, tmp_path_factory):
    dtype, comp, shuffle, chunk, shape, noisy = LAYOUTS[request.param]
    return _write_layout(tmp_path_factory.mktemp("layout") / "train", dtype, comp, shuffle, chunk, shape, noisy=noisy)


def test_layouts_are_read_without_hdf5_as_intended(layout, request):
    import h5py

    from hpc.data import rawio

    dtype, comp, shuffle, chunk, shape, noisy = LAYOUTS[request.node.callspec.params["layout"]]
    m = load_manifest(layout)
    for i in range(len(m.shards)):
        with h5py.File(m.shard_path(i), "r") as f:
            t = rawio.ChunkTable.from_dataset(f["x"])
        assert t is not None  # every layout here is read outside HDF5
        filtered = (comp[i % len(comp)] if isinstance(comp, tuple) else comp) is not None
        assert t.raw == (not filtered)
        # lzf could not shrink random chunks, so HDF5 stored them unfiltered (filter mask set):
        # that branch of the decoder is exercised too
        assert bool((t.masks != 0).any()) == (i in noisy), i


@pytest.mark.parametrize("io_threads", [1, 3])
def test_batches_equal_a_reference_read_of_the_same_rows(layout, io_threads):
    cases = [dict(rank=1, world_size=3, seed=4, remainder="pad", normalize=True, block_rows=7),
             dict(rank=0, world_size=2, seed=9, remainder="drop", normalize=False, block_rows=30),
             dict(rank=0, world_size=1, seed=1, remainder="pad", normalize=False, block_rows=None,
                  shuffle_buffer_mb=1.0)]
    for kw in cases:
        kw = dict(kw)
        mb = kw.pop("shuffle_buffer_mb", 40 * 3 * 16 * 16 * 4 / 2**20)  # windows of ~40 rows: many per epoch
        for epoch in (0, 1):
            r = StreamingReader(layout, batch_size=16, shuffle_buffer_mb=mb, io_threads=io_threads, prefetch=2, **kw)
            r.set_epoch(epoch)
            want = _reference(r, kw["normalize"])
            got = collect(r)
            assert len(got) == len(want) > 0
            for g, e in zip(got, want):
                assert g.keys() == e.keys()
                for k in g:  # the same bytes, not just close values
                    assert g[k].dtype == e[k].dtype and g[k].tobytes() == e[k].tobytes(), (kw, epoch, k)
            # and the portable path (HDF5 for every read) agrees
            h = StreamingReader(layout, batch_size=16, shuffle_buffer_mb=mb, direct_io=False, prefetch=0, **kw)
            h.set_epoch(epoch)
            assert same_batches(collect(h), got)


def test_resume_on_the_parallel_path_yields_the_rest_of_the_epoch(layout):
    kw = dict(batch_size=8, seed=3, remainder="pad", block_rows=7, io_threads=3,
              shuffle_buffer_mb=30 * 3 * 16 * 16 * 4 / 2**20, augment=None)
    full = collect(StreamingReader(layout, 1, 2, **kw))
    for k in (1, len(full) // 2, len(full) - 1):
        a = StreamingReader(layout, 1, 2, **kw)
        it = iter(a)
        for _ in range(k):
            next(it)
        state = a.state_dict()
        it.close()
        b = StreamingReader(layout, 1, 2, **kw)
        b.load_state_dict(state)
        b.set_epoch(0)
        assert same_batches(collect(b), full[k:]), k


def test_portable_path_without_ctypes_preadv_gives_the_same_batches(layout, monkeypatch):
    from hpc.data import rawio

    kw = dict(batch_size=16, seed=2, remainder="pad", block_rows=7, shuffle_buffer_mb=0.05)
    fast = collect(StreamingReader(layout, 0, 1, **kw))
    monkeypatch.setattr(rawio, "_PREADV", None)  # e.g. a platform without libc preadv
    assert not rawio.available()
    assert same_batches(collect(StreamingReader(layout, 0, 1, **kw)), fast)


def test_a_corrupt_compressed_chunk_names_the_shard(tmp_path):
    import h5py

    from hpc.data import rawio

    d = _write_layout(tmp_path / "train", "float32", "gzip", False, 20)
    m = load_manifest(d)
    with h5py.File(m.shard_path(1), "r") as f:
        t = rawio.ChunkTable.from_dataset(f["x"])
    with open(m.shard_path(1), "r+b") as f:  # garble the middle of a compressed chunk
        f.seek(int(t.offsets[1] + t.sizes[1] // 2))
        f.write(b"\xff" * 64)
    r = StreamingReader(d, 0, 1, 8, io_threads=3, verify=False)
    with pytest.raises(ShardReadError, match=r"part-1\.h5: read of 'x' failed .*cannot decompress"):
        collect(r)


@pytest.mark.parametrize("io_threads", [1, 3])
def test_held_batches_survive_buffer_reuse_on_every_path(layout, io_threads):
    # The consumer keeps every batch (as tensors, no copies) of two epochs: recycled batch and
    # window buffers must never be written while it holds them.
    r = StreamingReader(layout, 0, 1, 8, seed=6, normalize=False, remainder="pad", block_rows=7,
                        shuffle_buffer_mb=0.02, prefetch=2, io_threads=io_threads)
    held = list(r) + list(r)
    for b in held:
        real = b["weight"] > 0
        x = b["x"].reshape(len(real), -1)[real]
        ids = b["row_id"][real]
        assert torch.equal(x[:, 0].double(), (ids % 251).double()) and torch.equal(x[:, 1].double(),
                                                                                   (ids // 251).double())
        assert torch.equal(b["y"][real], ids % 5)


def test_bench_loader_emits_its_rows(tmp_path, capsys):
    import json

    from hpc.cli import main as cli

    assert cli(["data", "synth", "--kind", "images", "--samples", "500", "--size", "16", "--split", "train=1",
                "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    out_json = tmp_path / "b.json"
    assert cli(["bench", "loader", "--data", str(tmp_path / "d"), "--repeat", "1", "--naive-samples", "32",
                "--rss-gb", "", "--compact-samples", "0", "--integrity-samples", "0", "--uint8-samples", "300",
                "--rss-dir", str(tmp_path), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "reader/raw = " in out and "reader/practical limit = " in out and "median of 1 interleaved" in out
    names = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    main_rows = ["raw", "practical limit", "reader", "reader, 1 io thread", "reader_hdf5_io", "naive"]
    assert names == ["loader"] + main_rows + ["loader"] + main_rows[:4]
    res = json.loads(out_json.read_text())
    assert res["statistic"] == "median" and res["reader_vs_raw"] > 0 and res["reader_vs_practical"] > 0
    assert {k: res[k]["samples"] for k in main_rows[:5]} == dict.fromkeys(main_rows[:5], 500)
    u8 = res["uint8"]
    assert all(v["samples"] == 300 for v in u8["rows"].values())
    assert (res["bytes_per_sample"] - 8) == 4 * (u8["bytes_per_sample"] - 8)  # x: 4x fewer bytes moved
    assert not list(tmp_path.glob("hpc-uint8-*"))  # the copy is removed


# -- layouts the lock-free path must leave to HDF5, and its edge cases (review of the rawio path) --

def _write_with(d, writer, counts=(70, 45, 61), shape=(3, 16, 16), file_kw=None):
    """Shards whose datasets ``writer(f, i, x, y)`` creates (any h5py layout), indexed in place;
    rows hold their ids like ``_write_layout``'s."""
    import h5py

    from hpc.data import index_hdf5

    d.mkdir(parents=True)
    start = 0
    for i, n in enumerate(counts):
        ids = np.arange(start, start + n)
        size = int(np.prod(shape))
        x = (ids[:, None] * 3 + np.arange(size)[None, :] // 7) % 200
        x[:, 0], x[:, 1] = ids % 251, ids // 251
        with h5py.File(d / f"part-{i}.h5", "w", **(file_kw or {})) as f:
            writer(f, i, x.reshape((n,) + shape).astype("float32"), (ids % 5).astype("int64"))
        start += n
    index_hdf5(d, {"x": "/x", "y": "/y"})
    return d


def _same_as_h5py(d, io_threads_list=(1, 3)):
    """Batches (parallel path, each ``io_threads``) and ``iter_shard`` (shardio's os.preadv path)
    equal a plain h5py read of the same rows."""
    import h5py

    for io_threads in io_threads_list:
        r = StreamingReader(d, batch_size=16, seed=4, remainder="pad", normalize=False, block_rows=7,
                            shuffle_buffer_mb=40 * 3 * 16 * 16 * 4 / 2**20, io_threads=io_threads, prefetch=2,
                            verify=False)
        want = _reference(r, False)
        got = collect(r)
        assert len(got) == len(want) > 0
        for g, e in zip(got, want):
            for k in e:
                assert g[k].tobytes() == e[k].tobytes(), (io_threads, k)
    m = load_manifest(d)
    for i in range(len(m.shards)):
        with h5py.File(m.shard_path(i), "r") as f:
            x = f["x"][()]
        got = np.concatenate([b["x"].numpy() for b in iter_shard(d, i, 16, normalize=False)])
        assert np.array_equal(got, x), i


def _fast_paths(d, field="x"):
    """Per shard: (rawio's table, shardio's os.preadv reader) of ``field``, None where HDF5 reads."""
    from hpc.data import rawio
    from hpc.data.shardio import ShardFiles

    m = load_manifest(d)
    files = ShardFiles(m)
    try:
        return [(rawio.ChunkTable.from_dataset(files.dataset(i, field), m.shard_path(i)), files.direct(i, field))
                for i in range(len(m.shards))]
    finally:
        files.close()


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_a_dataset_behind_an_external_link_is_read_from_its_own_file(tmp_path, compression):
    def writer(f, i, x, y):
        import h5py

        side = tmp_path / "train" / f"data-{i}.side"
        with h5py.File(side, "w") as g:
            g.create_dataset("x", data=x, chunks=(20,) + x.shape[1:], compression=compression)
        f["x"] = h5py.ExternalLink(side.name, "/x")
        f.create_dataset("y", data=y)
        f.create_dataset("meta", data=np.full(400_000, 0.5, np.float32))  # the shard outgrows the linked file

    d = _write_with(tmp_path / "train", writer)
    _same_as_h5py(d)
    assert all(t is None and direct is None for t, direct in _fast_paths(d))  # HDF5 follows the link
    assert all(t is not None for t, _ in _fast_paths(d, "y"))  # the shard's own datasets stay fast


def _bf16_like():
    import h5py

    t = h5py.h5t.IEEE_F32LE.copy()  # a 2-byte float (bfloat16's layout): h5py shows it as float32
    t.set_fields(15, 7, 8, 0, 7)
    t.set_size(2)
    t.set_ebias(127)
    return t


@pytest.mark.parametrize("chunks,compression", [(None, None), ((20, 3, 16, 16), None), ((20, 3, 16, 16), "gzip")])
def test_a_file_type_h5py_converts_is_read_through_hdf5(tmp_path, chunks, compression):
    import h5py

    def writer(f, i, x, y):
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        if chunks:
            dcpl.set_chunk(chunks)
            if compression:
                dcpl.set_deflate(4)
        ds = h5py.h5d.create(f.id, b"x", _bf16_like(), h5py.h5s.create_simple(x.shape), dcpl=dcpl)
        ds.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(x))
        f.create_dataset("y", data=y)

    d = _write_with(tmp_path / "train", writer)
    with h5py.File(load_manifest(d).shard_path(0), "r") as f:
        assert f["x"].dtype == np.float32 and f["x"].id.get_type().get_size() == 2
    _same_as_h5py(d)
    assert all(t is None and direct is None for t, direct in _fast_paths(d))


@pytest.mark.parametrize("filters", ["gzip", "lzf+shuffle"])
def test_edge_chunks_stored_unfiltered_by_dont_filter_partial_chunks(tmp_path, filters):
    import ctypes
    import glob

    import h5py

    libs = glob.glob(os.path.join(os.path.dirname(h5py.__file__) + ".libs", "libhdf5-*.so*")) + \
        glob.glob(os.path.join(os.path.dirname(h5py.__file__), "..", "h5py.libs", "libhdf5-*.so*"))
    try:
        lib = ctypes.CDLL(libs[0] if libs else os.path.join(os.path.dirname(h5py.__file__), "defs.so"))
        set_opts = lib.H5Pset_chunk_opts
    except (OSError, AttributeError):
        pytest.skip("H5Pset_chunk_opts not reachable through ctypes")
    set_opts.argtypes = [ctypes.c_int64, ctypes.c_uint]

    def writer(f, i, x, y):
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((20,) + x.shape[1:])
        if filters == "gzip":
            dcpl.set_deflate(4)
        else:
            dcpl.set_shuffle()
            dcpl.set_filter(32000, h5py.h5z.FLAG_OPTIONAL)
        assert set_opts(dcpl.id, 0x0002) >= 0  # H5D_CHUNK_DONT_FILTER_PARTIAL_CHUNKS
        ds = h5py.h5d.create(f.id, b"x", h5py.h5t.py_create(x.dtype), h5py.h5s.create_simple(x.shape), dcpl=dcpl)
        ds.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(x))
        f.create_dataset("y", data=y)

    d = _write_with(tmp_path / "train", writer, file_kw=dict(libver="latest"))  # every shard has an edge chunk
    _same_as_h5py(d)
    assert all(t is None for t, _ in _fast_paths(d))  # HDF5 reads them (ambiguous to chunk_iter)


def _capped_preadv(monkeypatch, cap):
    """Make every read move at most ``cap`` bytes, as Linux does past 0x7ffff000 (MAX_RW_COUNT)."""
    import ctypes

    from hpc.data import rawio

    real_ctypes, real_os = rawio._PREADV, os.preadv

    def fake_ctypes(fd, iov_base, n, offset):
        iov = np.frombuffer((ctypes.c_uint64 * (2 * n)).from_address(iov_base), np.uint64).reshape(n, 2).copy()
        ends = np.minimum(np.cumsum(iov[:, 1].astype(np.int64)), cap)
        iov[:, 1] = np.diff(np.concatenate([[0], ends])).astype(np.uint64)
        return real_ctypes(fd, rawio.address(iov), n, offset)

    def fake_os(fd, buffers, offset):
        out, room = [], cap
        for b in buffers:
            v = memoryview(b).cast("B")[:max(room, 0)]
            room -= len(v)
            out.append(v)
        return real_os(fd, out, offset)

    monkeypatch.setattr(rawio, "_PREADV", fake_ctypes)
    monkeypatch.setattr(os, "preadv", fake_os)


def test_partial_preadv_counts_continue_and_only_eof_is_short(tmp_path, monkeypatch):
    from hpc.data import rawio
    from hpc.data.shardio import _preadv

    if not rawio.available():
        pytest.skip("no libc preadv")
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
    p = tmp_path / "f.bin"
    p.write_bytes(data.tobytes())
    _capped_preadv(monkeypatch, 333)  # a row (300 B), and runs of rows, cross the per-call limit
    fd = os.open(p, os.O_RDONLY)
    try:
        rows = np.zeros((20, 300), np.uint8)
        iov = rawio.iovecs(np.array([rawio.address(rows[i]) for i in range(20)], np.uint64), 300)
        rawio.preadv_runs(fd, rawio.check_iovecs(iov), 20, [(7, 0, 20, 300)])
        assert np.array_equal(rows.reshape(-1), data[7:6007])
        rows[:] = 0  # and with a cap of our own below the row size
        rawio.preadv_runs(fd, rawio.check_iovecs(iov), 20, [(7, 0, 20, 300)], cap=100)
        assert np.array_equal(rows.reshape(-1), data[7:6007])
        dest = np.zeros(5000, np.uint8)
        rawio.pread_into(fd, dest, 11)
        assert np.array_equal(dest, data[11:5011])
        parts = [np.zeros(700, np.uint8) for _ in range(3)]
        assert _preadv(fd, [memoryview(a) for a in parts], 13, 2100) == 2100
        assert np.array_equal(np.concatenate(parts), data[13:2113])
        with pytest.raises(OSError, match=r"short read: 1000 of 2000 bytes .*hpc data verify"):
            rawio.pread_into(fd, np.zeros(2000, np.uint8), 9000)  # past the end: the only short read
        with pytest.raises(OSError, match=r"short read.*hpc data verify"):
            rawio.preadv_runs(fd, rawio.check_iovecs(iov), 20, [(9000, 0, 20, 300)])
    finally:
        os.close(fd)


def test_a_shard_replaced_by_fewer_rows_between_epochs_names_the_file(tmp_path):
    import h5py

    d = _write_layout(tmp_path / "train", "float32", None, False, 20)
    r = StreamingReader(d, batch_size=8, normalize=False, verify=False, io_threads=1, prefetch=0, seed=1)
    collect(r)  # epoch 0: chunk tables cached
    p = load_manifest(d).shard_path(1)
    with h5py.File(p, "r") as f:
        x, y = f["x"][:41], f["y"][:41]
    with h5py.File(str(p) + ".new", "w") as f:  # 45 -> 41 rows: the edge chunk still covers 41-44
        f.create_dataset("x", data=x, chunks=(20,) + x.shape[1:])
        f.create_dataset("y", data=y, chunks=(20,))
    os.replace(str(p) + ".new", p)
    with pytest.raises(ShardReadError, match=r"part-1\.h5:/x has 41 rows, manifest says 45.*hpc data verify"):
        collect(r)


def test_decode_errors_say_what_to_do(tmp_path):
    import h5py

    from hpc.data import rawio

    d = _write_layout(tmp_path / "train", "float32", "gzip", False, 20)
    p = load_manifest(d).shard_path(0)
    with h5py.File(p, "r") as f:
        t = rawio.ChunkTable.from_dataset(f["x"])
    assert t is not None and t.filters == (rawio.FILTER_DEFLATE,)
    with open(p, "r+b") as f:
        f.seek(int(t.offsets[0] + t.sizes[0] // 2))
        f.write(b"\xff" * 64)
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match=r"cannot decompress .*hpc data verify.*re-create the shard"):
            rawio.decode_chunk(fd, t, 0, np.empty(t.chunk_bytes, np.uint8), np.empty(t.max_stored, np.uint8),
                               np.empty(t.chunk_bytes, np.uint8))
    finally:
        os.close(fd)
