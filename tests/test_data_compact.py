"""Compact feature dtypes: uint8/int8/uint16/int16/float16/bfloat16 on disk, float32 to the model.

Most data here is written the way another lab writes it (h5py directly: datasets /images, /labels,
/ids, uint8 pixels, int16 labels, odd chunk shapes, gzip in one file, lzf in another, uneven file
sizes), not by our writer. Checked: `hpc data index` accepts it and records the stored dtypes and
exact statistics; the reader moves the compact bytes (preadv included) and yields the float32
batches a float32 copy of the same values gives; the digits CNN trains on it on 2 ranks, is
registered and scores the test files on 2 ranks, with the accuracy recomputed from the predictions;
NaN/Inf, values a --store-dtype cannot hold and unusable dtypes are refused naming the user's file,
dataset, rows and values, with nothing written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import mpi_env
from hpc.cli import main as cli
from hpc.data import FieldSpec, ShardWriter, StreamingReader, WriterConfig, iter_shard, load_manifest
from hpc.data.verify import verify
from _data_util import collect, same_batches

# Another lab's layout of scikit-learn's digits: per split, files of uneven size with their own
# compression and chunking (rows per chunk deliberately not dividing anything).
LAYOUT = {
    "train": [(700, "gzip", 29), (61, "lzf", 7), (496, None, 113)],  # the last: unfiltered (preadv)
    "val": [(180, None, None)],                                       # contiguous
    "test": [(241, "gzip", 13), (119, "lzf", 17)],
}


def write_lab(root: Path, x: np.ndarray, y: np.ndarray, ids: np.ndarray, layout=LAYOUT) -> dict[str, Path]:
    dirs, start = {}, 0
    for split, files in layout.items():
        d = root / split
        d.mkdir(parents=True)
        for i, (n, comp, chunk) in enumerate(files):
            sl = slice(start, start + n)
            with h5py.File(d / f"{split}_{i:02d}.h5", "w") as f:
                f.attrs["instrument"] = "scanner-7"
                f.create_dataset("images", data=x[sl], compression=comp,
                                 chunks=(chunk,) + x.shape[1:] if chunk else None)
                f.create_dataset("labels", data=y[sl], compression=comp, chunks=(chunk + 2,) if chunk else None)
                f.create_dataset("ids", data=ids[sl])
            start += n
        dirs[split] = d
    assert start == len(x)
    return dirs


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Digits as 8-bit images (sklearn's 0..16 scaled to 0..255), int16 labels, int64 ids, shuffled."""
    sk = pytest.importorskip("sklearn.datasets")
    digits = sk.load_digits()
    order = np.random.default_rng(7).permutation(len(digits.target))
    x = np.clip(np.rint(digits.images[order] * 16), 0, 255).astype(np.uint8)   # [N, 8, 8]
    y = digits.target[order].astype(np.int16)
    ids = (1_000_000 + order * 3).astype(np.int64)   # the lab's own ids, not our row numbers
    root = tmp_path_factory.mktemp("lab")
    dirs = write_lab(root, x, y, ids)
    for d in dirs.values():
        assert cli(["data", "index", str(d), "--x", "/images", "--y", "/labels", "--field", "id=/ids"]) == 0
    return {"root": root, "dirs": dirs, "x": x, "y": y, "ids": ids}


def test_index_records_stored_dtypes_and_exact_statistics(lab):
    d = lab["dirs"]["train"]
    n = sum(n for n, _, _ in LAYOUT["train"])
    m = load_manifest(d)
    assert m.task == "classification" and m.sample_counts == [700, 61, 496]
    raw = json.loads((d / "manifest.json").read_text())["fields"]
    assert raw == {"x": {"dtype": "uint8", "shape": [8, 8]}, "y": {"dtype": "int16", "shape": []},
                   "id": {"dtype": "int64", "shape": []}}
    # What a model sees: float32 features, int64 labels/ids.
    assert m.schema()["fields"] == {"x": {"dtype": "float32", "shape": [8, 8]},
                                    "y": {"dtype": "int64", "shape": []}, "id": {"dtype": "int64", "shape": []}}
    x = lab["x"][:n].astype(np.float64)
    np.testing.assert_allclose(m.stats["x"]["mean"], x.mean(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(m.stats["x"]["std"], x.std(axis=(0, 2)), rtol=1e-12)
    assert m.class_counts == np.bincount(lab["y"][:n], minlength=10).tolist()
    assert verify(d) == ([], 3)
    # iter_shard (batch inference) yields float32 of exactly the stored values, across all files.
    got = {k: np.concatenate([b[k].numpy() for s in range(3) for b in iter_shard(d, s, 50, normalize=False)])
           for k in ("x", "y", "id")}
    assert got["x"].dtype == np.float32 and np.array_equal(got["x"], lab["x"][:n].astype(np.float32))
    assert got["y"].dtype == np.int64 and np.array_equal(got["y"], lab["y"][:n])
    assert np.array_equal(got["id"], lab["ids"][:n])
    # The streaming reader on 3 ranks: float32 batches normalized with the manifest's statistics.
    mean = np.float32(m.stats["x"]["mean"]).reshape(8, 1)
    inv = (1 / np.float32(m.stats["x"]["std"])).astype(np.float32).reshape(8, 1)
    seen = []
    for r in range(3):
        for b in collect(StreamingReader(d, r, 3, 64, remainder="pad")):
            keep = b["weight"] > 0
            assert b["x"].dtype == np.float32
            want = (lab["x"][b["row_id"][keep]].astype(np.float32) - mean) * inv
            np.testing.assert_array_equal(b["x"][keep], want)
            seen.append(b["row_id"][keep])
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(n))


@pytest.mark.mpi
def test_uint8_digits_train_register_infer_on_two_ranks(lab, tmp_path):
    env = mpi_env({"HPC_REGISTRY": str(tmp_path / "registry")})

    def hpc(*args, timeout=600):
        r = subprocess.run([sys.executable, "-m", "hpc", *args], capture_output=True, text=True,
                           timeout=timeout, env=env)
        assert r.returncode == 0, f"hpc {' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    hpc("train", "digits_cnn", f"data.dir={lab['root']}", f"out_dir={tmp_path / 'runs'}", "run_id=u8", "--nproc", "2")
    run = tmp_path / "runs" / "digits_cnn" / "u8"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["schema"]["fields"]["x"] == {"dtype": "float32", "shape": [8, 8]}
    out = hpc("registry", "add", str(run), "--name", "digits-u8", "--from", "best")
    version = out.strip().split()[-1]
    hpc("registry", "promote", "digits-u8", version, "--alias", "production")
    pred = tmp_path / "pred"
    hpc("infer", "--model", "digits-u8@production", "--input", str(lab["dirs"]["test"]), "--output", str(pred),
        "--nproc", "2")
    df = pd.read_parquet(pred)
    n_test = sum(n for n, _, _ in LAYOUT["test"])
    assert len(df) == n_test
    assert sorted(df["row_id"]) == list(range(n_test))          # every row exactly once
    test_ids = lab["ids"][-n_test:]
    assert sorted(df["id"]) == sorted(test_ids.tolist())         # the lab's ids carried through
    label_of = dict(zip(test_ids.tolist(), lab["y"][-n_test:].tolist()))
    accuracy = float((df["prediction"].to_numpy() == df["id"].map(label_of).to_numpy()).mean())
    print(f"uint8 digits: test accuracy {accuracy:.4f} recomputed from {len(df)} predictions")
    assert accuracy >= 0.98, accuracy


def _npz_pair(tmp_path, x, y, name="a.npz"):
    """The same integer-valued images sharded as uint8 and as float32 (from one float64 .npz)."""
    np.savez(tmp_path / name, images=x.astype(np.float64), target=y)
    for dtype in ("uint8", "float32"):
        assert cli(["data", "shard", "--from", str(tmp_path / name), "--x", "images", "--label", "target",
                    "--out", str(tmp_path / dtype), "--split", "train=0.75,test=0.25", "--samples-per-shard", "150",
                    "--store-dtype", dtype]) == 0
    return tmp_path / "uint8" / "train", tmp_path / "float32" / "train"


def test_uint8_and_float32_shards_of_the_same_values_read_the_same(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    n = 800
    x = rng.integers(0, 256, (n, 3, 24, 24))     # 1728 bytes a row as uint8: the scatter path
    u8, f32 = _npz_pair(tmp_path, x, rng.integers(0, 5, n))
    mu, mf = load_manifest(u8), load_manifest(f32)
    assert mu.fields["x"].dtype == "uint8" and mf.fields["x"].dtype == "float32"
    assert mu.stats == mf.stats and mu.schema() == mf.schema()   # bit-identical statistics
    assert sum(s.bytes for s in mu.shards) < sum(s.bytes for s in mf.shards) / 3
    kw = dict(batch_size=32, remainder="pad", block_rows=40, shuffle_buffer_mb=1e3, seed=5)
    for r in range(3):
        a = collect(StreamingReader(u8, r, 3, **kw))
        assert a[0]["x"].dtype == np.float32
        assert same_batches(a, collect(StreamingReader(f32, r, 3, **kw)))
        assert same_batches(a, collect(StreamingReader(u8, r, 3, direct_io=False, **kw)))
        assert same_batches(collect(StreamingReader(u8, r, 3, 48, shuffle=False, normalize=False)),
                            collect(StreamingReader(f32, r, 3, 48, shuffle=False, normalize=False)))
    for s in range(len(mu.shards)):
        assert same_batches(collect(iter_shard(u8, s, 64)), collect(iter_shard(f32, s, 64)))

    # The reads move the stored bytes: preadv (the fast paths: libc's through hpc.data.rawio for the
    # images, os.preadv for the labels) carries 1 byte a pixel for uint8.
    from hpc.data import rawio

    moved = []
    real, real_libc = os.preadv, rawio._PREADV

    def counting(fd, buffers, offset):
        got = real(fd, buffers, offset)
        moved.append(got)
        return got

    def counting_libc(fd, iov, count, offset):
        got = real_libc(fd, iov, count, offset)
        moved.append(got)
        return got

    monkeypatch.setattr(os, "preadv", counting)
    if real_libc is not None:
        monkeypatch.setattr(rawio, "_PREADV", counting_libc)
    for split, pixel in ((u8, 1), (f32, 4)):
        moved.clear()
        m = load_manifest(split)
        collect(StreamingReader(split, 0, 1, 32, remainder="pad", prefetch=0))
        assert sum(moved) == m.total_samples * (3 * 24 * 24 * pixel + 8)   # x + int64 labels, once


def test_small_uint8_rows_take_the_gathered_preadv_path(lab, monkeypatch):
    """64-byte digit rows are gathered through a window buffer, still read with os.preadv."""
    d = lab["dirs"]["train"]
    m = load_manifest(d)
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, b, o: calls.append(o) or real(fd, b, o))
    a = collect(StreamingReader(d, 0, 1, 64, remainder="pad", prefetch=0, seed=1))
    assert calls  # the unfiltered file (train_02.h5) is read without HDF5
    b = collect(StreamingReader(d, 0, 1, 64, remainder="pad", prefetch=0, seed=1, direct_io=False))
    assert same_batches(a, b) and m.fields["x"].dtype == "uint8"


def test_nan_and_inf_refused_by_index_with_positions(tmp_path, capsys):
    d = tmp_path / "half"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, n in enumerate((40, 25, 33)):   # another lab's half-precision images, uneven files
        x = rng.normal(size=(n, 2, 5, 5)).astype(np.float16)
        if i == 1:
            x[5, 1, 2, 3] = np.nan
        if i == 2:
            x[2, 0, 0, 4] = np.inf
            x[9, 1, 4, 4] = -np.inf
        with h5py.File(d / f"run{i}.h5", "w") as f:
            f.create_dataset("images", data=x, chunks=(6, 2, 5, 5), compression="gzip" if i else None)
            f.create_dataset("labels", data=rng.integers(0, 3, n).astype(np.uint8))
    assert cli(["data", "index", str(d), "--x", "/images", "--y", "/labels"]) == 2
    err = capsys.readouterr().err
    assert "3 row(s) with NaN/Inf" in err
    assert f"{d / 'run1.h5'}:/images row 5 [1, 2, 3] = nan" in err
    assert f"{d / 'run2.h5'}:/images row 2 [0, 0, 4] = inf" in err
    assert f"{d / 'run2.h5'}:/images row 9 [1, 4, 4] = -inf" in err
    assert "run0.h5" not in err and "manifest" not in err
    assert sorted(p.name for p in d.iterdir()) == ["run0.h5", "run1.h5", "run2.h5"]   # nothing written
    # Without the bad rows the same files index, float16 stored, float32 yielded.
    for i in (1, 2):
        (d / f"run{i}.h5").unlink()
    assert cli(["data", "index", str(d), "--x", "/images", "--y", "/labels"]) == 0
    m = load_manifest(d)
    assert m.fields["x"].dtype == "float16" and m.schema()["fields"]["x"]["dtype"] == "float32"
    with h5py.File(d / "run0.h5") as f:
        want = f["images"][:].astype(np.float64)
    np.testing.assert_allclose(m.stats["x"]["mean"], want.mean(axis=(0, 2, 3)), rtol=1e-12)


def test_nan_refused_by_shard_names_file_array_rows(tmp_path, capsys):
    x = np.arange(5 * 12, dtype=np.float64).reshape(12, 5) % 200
    x[4, 3], x[10, 0] = np.nan, np.inf
    np.savez(tmp_path / "scan.npz", pixels=x, cls=np.arange(12) % 3)
    out = tmp_path / "out"
    argv = ["data", "shard", "--from", str(tmp_path / "scan.npz"), "--x", "pixels", "--label", "cls",
            "--out", str(out), "--store-dtype", "uint8"]
    assert cli(argv + ["--on-bad-rows", "error"]) == 2
    err = capsys.readouterr().err
    assert (f"{tmp_path / 'scan.npz'}:pixels: 2 row(s) with NaN/Inf among source rows 0..11 "
            "(first: row 4 [3] = nan, row 10 [0] = inf)") in err
    assert not out.exists()  # no manifest, no shards, no directories
    # The default policy drops (and counts) them; the rest fits uint8 exactly.
    assert cli(argv) == 0
    ms = {s: load_manifest(out / s) for s in ("train", "val", "test")}
    assert sum(m.bad_rows["dropped"] for m in ms.values()) == 2
    assert all(m.fields["x"].dtype == "uint8" for m in ms.values())


def test_store_dtype_refuses_values_that_do_not_fit(tmp_path, capsys):
    x = np.tile(np.arange(40, dtype=np.float64)[:, None], (1, 4))
    x[17, 2], x[30, 1], x[33, 0] = 2.5, 256, -1
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 2)
    out = tmp_path / "out"
    base = ["data", "shard", "--from", str(tmp_path / "d.npz"), "--out", str(out)]
    assert cli(base + ["--store-dtype", "uint8"]) == 2
    err = capsys.readouterr().err
    assert (f"{tmp_path / 'd.npz'}:x: 3 value(s) among source rows 0..39 do not fit --store-dtype uint8 "
            "(only integers 0..255 are stored exactly; first: row 17 [2] = 2.5, row 30 [1] = 256.0, "
            "row 33 [0] = -1.0)") in err
    assert not out.exists()
    big = np.full((6, 2), 1e5)
    np.savez(tmp_path / "big.npz", x=big, y=np.arange(6) % 2)
    assert cli(["data", "shard", "--from", str(tmp_path / "big.npz"), "--out", str(out), "--store-dtype",
                "float16"]) == 2
    assert "12 value(s) among source rows 0..5 do not fit --store-dtype float16 (beyond float16's range" in \
        capsys.readouterr().err
    assert cli(base + ["--store-dtype", "int32"]) == 2
    assert "--store-dtype 'int32': valid are uint8, int8, uint16, int16, float16, bfloat16, float32" in \
        capsys.readouterr().err
    assert not out.exists()
    # int16 holds them (2.5 aside): round it and the shard is exact.
    x[17, 2] = 3
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 2)
    assert cli(base + ["--store-dtype", "int16", "--split", "all=1"]) == 0
    got = np.concatenate([b["x"].numpy() for b in iter_shard(out / "all", 0, 100, normalize=False)])
    assert load_manifest(out / "all").fields["x"].dtype == "int16" and np.array_equal(got, x.astype(np.float32))


def test_writer_error_removes_what_it_published(tmp_path):
    """A bad batch after complete shards were published: the shards and directories go too."""
    out = tmp_path / "deep" / "split"
    fields = {"x": FieldSpec("float32", (3,)), "y": FieldSpec("int64", ())}
    with pytest.raises(ValueError, match=r"do not fit --store-dtype uint8"):
        with ShardWriter(out, "classification", fields, WriterConfig(samples_per_shard=4, store_dtype="uint8"),
                         source="lab.h5", names={"x": "/images"}) as w:
            w.add({"x": np.ones((10, 3)), "y": np.zeros(10, np.int64)})
            assert len(w.shards) == 2 and (out / "shard-00001.h5").exists()
            w.add({"x": np.full((2, 3), 0.5), "y": np.zeros(2, np.int64)})
    assert not (tmp_path / "deep").exists()


def test_bfloat16_and_float16_store_round_like_torch(tmp_path):
    rng = np.random.default_rng(11)
    x = (rng.normal(size=(300, 16)) * np.logspace(-3, 4, 16)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=rng.integers(0, 4, 300))
    for dtype in ("bfloat16", "float16"):
        out = tmp_path / dtype
        assert cli(["data", "shard", "--from", str(tmp_path / "f.npz"), "--out", str(out), "--split", "all=1",
                    "--store-dtype", dtype, "--compression", "lzf"]) == 0
        m = load_manifest(out / "all")
        got = np.concatenate([b["x"].numpy() for b in iter_shard(out / "all", 0, 128, normalize=False)])
        want = torch.from_numpy(x).to(getattr(torch, dtype)).float().numpy()
        assert got.dtype == np.float32 and np.array_equal(got, want)
        np.testing.assert_allclose(m.stats["x"]["mean"], want.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
        assert m.schema()["fields"]["x"]["dtype"] == "float32" and verify(out / "all") == ([], 1)
    raw = json.loads((tmp_path / "bfloat16" / "all" / "manifest.json").read_text())["fields"]["x"]
    assert raw == {"dtype": "uint16", "shape": [16], "encoding": "bfloat16"}
    # Indexed as foreign files, the dataset's encoding attribute keeps them bfloat16.
    d = tmp_path / "bfloat16" / "all"
    (d / "manifest.json").unlink()
    assert cli(["data", "index", str(d), "--x", "/x", "--y", "/y"]) == 0
    assert load_manifest(d).fields["x"].encoding == "bfloat16"


def test_unusable_dtypes_name_the_users_dataset_not_our_manifest(tmp_path, capsys):
    d = tmp_path / "lab"
    d.mkdir()
    with h5py.File(d / "a.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((5, 4, 4), np.int32))
        f.create_dataset("labels", data=np.zeros(5, np.float32))
        f.create_dataset("good", data=np.zeros((5, 4, 4), np.uint8))
    assert cli(["data", "index", str(d), "--x", "/images", "--y", "/labels", "--task", "regression"]) == 2
    err = capsys.readouterr().err
    assert f"{d / 'a.h5'}:/images: dtype int32 is not a feature dtype hpc reads" in err
    assert "manifest.json" not in err and "field 'x'" not in err
    assert cli(["data", "index", str(d), "--x", "/good", "--y", "/labels", "--task", "classification"]) == 2
    assert f"{d / 'a.h5'}:/labels: dtype float32: task classification needs integer labels" in \
        capsys.readouterr().err
    assert list(d.iterdir()) == [d / "a.h5"]


def test_synth_images_as_uint8(tmp_path, capsys):
    assert cli(["data", "synth", "--kind", "images", "--samples", "300", "--size", "8", "--channels", "2",
                "--store-dtype", "uint8", "--split", "train=1", "--out", str(tmp_path / "i")]) == 0
    m = load_manifest(tmp_path / "i" / "train")
    x = next(iter_shard(m, 0, 300, normalize=False))["x"].numpy()
    assert m.fields["x"].dtype == "uint8" and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 255
    assert len(np.unique(x)) > 50 and m.provenance["synth"]["quantized"]["dtype"] == "uint8"
    assert cli(["data", "synth", "--kind", "tabular", "--samples", "30", "--store-dtype", "uint8",
                "--out", str(tmp_path / "t")]) == 2
    assert "tabular features are real-valued" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_bench_loader_emits_the_compact_rows(tmp_path, capsys):
    assert cli(["data", "synth", "--kind", "images", "--samples", "600", "--size", "16", "--split", "train=1",
                "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    out_json = tmp_path / "b.json"
    assert cli(["bench", "loader", "--data", str(tmp_path / "d"), "--repeat", "1", "--naive-samples", "64",
                "--rss-gb", "", "--compact-samples", "500", "--rss-dir", str(tmp_path), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "compact dtypes: the same 500 images stored as uint8 and as float32" in out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| uint8") or
            line.startswith("| float32")]
    assert rows == ["float32", "uint8"]
    res = json.loads(out_json.read_text())["compact"]
    assert res["uint8"]["samples"] == res["float32"]["samples"] == 500
    assert res["uint8"]["x_bytes_per_sample"] * 4 == res["float32"]["x_bytes_per_sample"] == 3 * 16 * 16 * 4
    assert res["uint8_vs_float32"] > 0
    assert not list(tmp_path.glob("hpc-compact-*"))  # its shard sets are deleted
