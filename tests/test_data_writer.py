"""Writing shards: synth kinds, sources (npz/csv/sklearn), stats, bad rows, atomicity, index."""

from __future__ import annotations

import json
import os
import stat

import h5py
import numpy as np
import pytest

from hpc.cli import main as cli
from hpc.data import StreamingReader, SynthConfig, WriterConfig, iter_shard, load_manifest, synth
from hpc.data.index import index_hdf5
from hpc.data.manifest import check_schema
from hpc.data.sources import shard_source
from hpc.data.verify import verify
from _data_util import collect


def read_all(split_dir, normalize=False):
    m = load_manifest(split_dir)
    out = {}
    for i in range(len(m.shards)):
        for b in iter_shard(split_dir, i, 4096, normalize=normalize):
            for k, v in b.items():
                out.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.mark.parametrize("kind", ["tabular", "images", "ratings"])
def test_synth_kinds_manifest_and_stats(tmp_path, kind):
    cfg = SynthConfig(kind=kind, samples=900, seed=3, classes=5, size=16, chunk=256)
    ms = synth(cfg, tmp_path, split="train=0.8,val=0.2", writer=WriterConfig(samples_per_shard=300))
    assert ms["train"].total_samples == 720 and ms["val"].total_samples == 180
    m = load_manifest(tmp_path / "train")
    assert [s.samples for s in m.shards] == [300, 300, 120]
    assert m.sha256 and m.path == (tmp_path / "train").resolve() and m.format_version == 1
    assert m.provenance["seed"] == 3 and m.provenance["source"] == f"synth:{kind}"
    assert "numpy" in m.provenance["versions"] and m.provenance["command"]
    data = read_all(tmp_path / "train")
    if kind == "ratings":
        assert m.task == "ratings" and m.num_users == cfg.users and m.num_items == cfg.items
        assert set(m.schema()["fields"]) == {"user", "item", "rating"}
        assert data["user"].dtype == np.int64 and data["rating"].dtype == np.float32
        assert data["user"].max() < cfg.users and data["item"].max() < cfg.items
        assert abs(m.stats["rating"]["std"][0] - data["rating"].std()) < 1e-4
    else:
        assert m.task == "classification" and m.num_classes == 5
        assert m.class_counts == np.bincount(data["y"], minlength=5).tolist()
        x = data["x"].astype(np.float64)
        axes = (0,) if kind == "tabular" else (0, 2, 3)
        np.testing.assert_allclose(m.stats["x"]["mean"], x.mean(axis=axes), atol=1e-6)
        np.testing.assert_allclose(m.stats["x"]["std"], x.std(axis=axes), rtol=1e-6)
        assert m.stats["x"]["per"] == ("feature" if kind == "tabular" else "channel")
        assert m.schema() == {"task": "classification", "num_classes": 5, "fields": {
            "x": {"dtype": "float32", "shape": list(x.shape[1:])}, "y": {"dtype": "int64", "shape": []}}}
    # Deterministic: the same seed gives the same bytes.
    synth(cfg, tmp_path / "again", split="train=0.8,val=0.2", writer=WriterConfig(samples_per_shard=300))
    assert [s.sha256 for s in load_manifest(tmp_path / "again" / "train").shards] == [s.sha256 for s in m.shards]
    assert verify(tmp_path / "train") == ([], 3)


def test_images_are_learnable_by_class_template(tmp_path):
    # The class signal is in the pattern, not the mean: per-class means differ only slightly,
    # but the energy pattern (template pixels) identifies the class.
    synth(SynthConfig(kind="images", samples=400, classes=3, noise=0.1, size=12), tmp_path, split="train=1")
    d = read_all(tmp_path / "train")
    energy = [(d["x"][d["y"] == c] ** 2).mean(axis=(0, 1)) for c in range(3)]
    assert min(np.abs(energy[0] - energy[1]).max(), np.abs(energy[1] - energy[2]).max()) > 0.01


def test_files_are_group_readable_and_no_temp_left(tmp_path):
    old = os.umask(0o027)
    try:
        synth(SynthConfig(kind="tabular", samples=100), tmp_path, split="train=1")
    finally:
        os.umask(old)
    for p in (tmp_path / "train").iterdir():
        assert not p.name.startswith("."), p
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p


def test_interrupted_shard_leaves_no_manifest_and_no_partial_file(tmp_path):
    cfg = SynthConfig(kind="tabular", samples=1000, chunk=100)
    from hpc.data.sources import write_splits
    from hpc.data.synth import synth_chunks

    def dying():
        for i, c in enumerate(synth_chunks(cfg)):
            if i == 5:
                raise KeyboardInterrupt
            yield c

    with pytest.raises(KeyboardInterrupt):
        write_splits(dying(), tmp_path, "classification", cfg.fields(), "train=1", 0,
                     WriterConfig(samples_per_shard=300), source="test")
    names = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert names == ["shard-00000.h5"]  # the one complete shard; no manifest, no temp file
    # A rerun refuses to mix with the leftovers unless asked, then replaces them.
    with pytest.raises(ValueError, match="--overwrite"):
        synth(cfg, tmp_path, split="train=1")
    synth(cfg, tmp_path, split="train=1", writer=WriterConfig(overwrite=True, samples_per_shard=300))
    assert load_manifest(tmp_path / "train").total_samples == 1000


def test_npz_bad_rows_drop_and_error(tmp_path):
    x = np.arange(60, dtype=np.float64).reshape(20, 3)
    x[3, 1], x[7, 0] = np.nan, np.inf
    y = np.arange(20) % 2
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ms = shard_source(str(tmp_path / "d.npz"), tmp_path / "out", split="all=1", seed=0, config=WriterConfig())
    m = ms["all"]
    assert m.total_samples == 18 and m.bad_rows == {"policy": "drop", "dropped": 2, "seen": 20}
    d = read_all(tmp_path / "out" / "all")
    keep = np.ones(20, bool)
    keep[[3, 7]] = False
    assert np.array_equal(d["x"], x[keep].astype(np.float32)) and np.array_equal(d["y"], y[keep])
    np.save(tmp_path / "feats.npy", x)
    np.save(tmp_path / "y.npy", y)
    m2 = shard_source(str(tmp_path / "feats.npy"), tmp_path / "npy", split="all=1", seed=0, config=WriterConfig())
    assert m2["all"].total_samples == 18 and read_all(tmp_path / "npy" / "all")["x"].tobytes() == d["x"].tobytes()
    with pytest.raises(ValueError, match=r"d\.npz:x: 2 row\(s\) with NaN/Inf among source rows 0\.\.19 "
                       r"\(first: row 3 \[1\] = nan, row 7 \[0\] = inf\)"):
        shard_source(str(tmp_path / "d.npz"), tmp_path / "err", split="all=1", seed=0,
                     config=WriterConfig(on_bad_rows="error"))
    assert not (tmp_path / "err").exists()  # nothing written, not even the directories


def test_csv_source_streams_with_label_column(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).round(3)
    y = rng.integers(0, 3, 300)
    lines = ["a,b,label,c,d"] + [f"{r[0]},{r[1]},{lab},{r[2]},{r[3]}" for r, lab in zip(x, y)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    rc = cli(["data", "shard", "--from", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"),
              "--split", "train=0.5,test=0.5", "--compression", "lzf", "--samples-per-shard", "64"])
    assert rc == 0
    parts = [read_all(tmp_path / "o" / s) for s in ("train", "test")]
    assert sum(len(p["y"]) for p in parts) == 300 and abs(len(parts[0]["y"]) - 150) <= 1
    got = np.concatenate([np.column_stack([p["x"], p["y"]]) for p in parts])
    want = np.column_stack([x.astype(np.float32), y])
    assert np.array_equal(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])])
    assert cli(["data", "shard", "--from", str(tmp_path / "t.csv"), "--out", str(tmp_path / "p"),
                "--label", "nope"]) == 2


def test_sklearn_digits_round_trip_bit_exact(tmp_path):
    sk = pytest.importorskip("sklearn.datasets")
    digits = sk.load_digits()
    assert cli(["data", "shard", "--from", "sklearn:digits", "--out", str(tmp_path), "--split", "train=1",
                "--samples-per-shard", "500"]) == 0
    d = read_all(tmp_path / "train")
    assert d["x"].tobytes() == digits.data.astype(np.float32).tobytes()
    assert d["y"].tobytes() == digits.target.astype(np.int64).tobytes()
    # And through the streaming reader (4 simulated ranks, padded): the same rows, each once.
    rows = []
    for r in range(4):
        for b in collect(StreamingReader(tmp_path / "train", r, 4, 64, remainder="pad", normalize=False)):
            keep = b["weight"] > 0
            assert np.array_equal(b["x"][keep], digits.data[b["row_id"][keep]].astype(np.float32))
            rows.append(b["row_id"][keep])
    assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(len(digits.target)))
    assert cli(["data", "shard", "--from", "sklearn:mnist", "--out", str(tmp_path / "x")]) == 2


def test_index_foreign_files_in_place(tmp_path):
    rng = np.random.default_rng(1)
    sizes, xs, ys = [100, 37, 250, 20], [], []
    d = tmp_path / "foreign"
    d.mkdir()
    for i, n in enumerate(sizes):
        x, y = rng.normal(size=(n, 1, 6, 6)), rng.integers(0, 3, n).astype(np.int32)
        with h5py.File(d / f"part{i}.hdf5", "w") as f:
            if i < 3:  # gzip, lzf, or uncompressed chunks of 7 rows (read with os.preadv)
                f.create_dataset("data/images", data=x, chunks=(7, 1, 6, 6),
                                 compression=("gzip", "lzf", None)[i])
                f.create_dataset("labels", data=y, chunks=(13,))
            else:  # contiguous layout
                f.create_dataset("data/images", data=x)
                f.create_dataset("labels", data=y)
        xs.append(x)
        ys.append(y)
    before = sorted(p.name for p in d.iterdir())
    assert cli(["data", "index", str(d), "--x", "/data/images", "--y", "/labels"]) == 0
    assert sorted(p.name for p in d.iterdir()) == sorted(before + ["manifest.json"])
    m = load_manifest(d)
    assert m.task == "classification" and m.sample_counts == sizes and m.fields["x"].dtype == "float64"
    assert m.class_counts == np.bincount(np.concatenate(ys), minlength=3).tolist()
    x = np.concatenate(xs)
    np.testing.assert_allclose(m.stats["x"]["mean"], [x.mean()], rtol=1e-9)
    got = read_all(d)
    assert np.array_equal(got["x"], x.astype(np.float32)) and got["y"].dtype == np.int64
    assert m.schema()["fields"]["x"]["dtype"] == "float32"  # what readers yield
    ids = np.concatenate([b["row_id"][b["weight"] > 0] for r in range(3) for b in
                          collect(StreamingReader(d, r, 3, 16, remainder="pad", normalize=False))])
    assert np.array_equal(np.sort(ids), np.arange(sum(sizes)))
    assert verify(d) == ([], 4)
    assert cli(["data", "index", str(d), "--x", "/nope", "--y", "/labels", "--overwrite"]) == 2
    with pytest.raises(ValueError, match="exists"):
        index_hdf5(d, {"x": "/data/images", "y": "/labels"})


def test_check_schema_names_differences(tmp_path):
    synth(SynthConfig(kind="tabular", samples=50, features=4, classes=3), tmp_path, split="train=1")
    m = load_manifest(tmp_path / "train")
    check_schema(m.schema(), m)
    other = json.loads(json.dumps(m.schema()))
    other["fields"]["x"]["shape"] = [5]
    with pytest.raises(ValueError, match=r"field 'x': model expects float32\[5\], data has float32\[4\]"):
        check_schema(other, m)


def test_writer_config_errors():
    with pytest.raises(ValueError, match="--compression 'zstd'"):
        WriterConfig(compression="zstd")
    with pytest.raises(ValueError, match="--kind 'video'"):
        SynthConfig(kind="video", samples=1)


def test_cli_synth_and_usage_errors(tmp_path, capsys):
    assert cli(["data", "synth", "--kind", "ratings", "--samples", "300", "--users", "20", "--items", "10",
                "--noise", "0.25", "--out", str(tmp_path), "--split", "train=0.9,val=0.1"]) == 0
    m = load_manifest(tmp_path / "train")
    assert (m.num_users, m.num_items, m.total_samples) == (20, 10, 270)
    assert m.provenance["synth"]["noise_floor_rmse"] == 0.25
    assert cli(["data", "synth", "--kind", "ratings", "--samples", "10", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["data", "synth", "--kind", "video", "--samples", "10", "--out", str(tmp_path / "v")]) == 2
    assert cli(["data", "synth", "--kind", "tabular", "--samples", "10", "--out", str(tmp_path / "t"),
                "--split", "train=0.5"]) == 2
