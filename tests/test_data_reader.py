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
