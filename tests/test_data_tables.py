"""Tables with a header (CSV, Parquet) -> shards: the fitted transform (hpc.data.tabular), id columns,
text labels, stated classes, missing cells, unlabeled data, and every bad input refused by name.

The tables are written the way another lab writes them: pandas ``to_csv`` / ``to_parquet``, with an
integer patient id, text labels, a text category column and empty cells.
"""

from __future__ import annotations

import json
import re
import zlib

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from hpc.cli import main as cli
from hpc.data import iter_shard, load_manifest, tablefiles
from hpc.data.tabular import OTHER, TableOptions, apply, fit

CLASSES = ["benign", "malignant"]


def read_split(split_dir) -> dict[str, np.ndarray]:
    m = load_manifest(split_dir)
    out: dict[str, list] = {}
    for i in range(len(m.shards)):
        for b in iter_shard(split_dir, i, 4096, normalize=False):
            for k, v in b.items():
                out.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def patients(n: int = 400, seed: int = 0, missing: float = 0.05) -> pd.DataFrame:
    """Patients as a hospital exports them: id, measurements with gaps, a site, a text diagnosis."""
    rng = np.random.default_rng(seed)
    size = rng.normal(10, 3, n)
    df = pd.DataFrame({"patient_id": 7000 + rng.permutation(n),
                       "size": size.round(3), "density": rng.normal(0, 1, n).round(3),
                       "age": rng.integers(20, 90, n).astype(float),
                       "site": rng.choice(["north", "south", "east"], n)})
    for c in ("size", "density", "age", "site"):
        df.loc[rng.random(n) < missing, c] = None
    df["diagnosis"] = np.where(size + rng.normal(0, 1, n) > 10, "malignant", "benign")
    return df


# ------------------------------------------------------------------------------ the transform (pure)
def test_fitted_transform_is_json_and_applies_medians_modes_other_and_hashing():
    train = pa.table({"id": [1, 2, 3, 4, 5], "v": [1.0, None, 3.0, 10.0, 2.0],
                      "site": ["a", "b", "a", None, "a"], "city": ["p", "q", "r", "s", "t"],
                      "label": ["yes", "no", "yes", "no", "yes"]})
    t = fit(train, TableOptions(label="label", max_onehot=3, hash_buckets=4))
    assert json.loads(json.dumps(t)) == t                       # JSON-able, as the manifest stores it
    assert [i["column"] for i in t["ids"]] == ["id"] and t["ids"][0]["auto"]
    assert t["label"]["names"] == ["no", "yes"] and t["task"] == "classification"
    assert t["x_columns"] == ["v", "v:missing", "site=a", "site=b", f"site={OTHER}", "site:missing",
                              "city#0", "city#1", "city#2", "city#3"]
    v, site, city = t["features"]
    assert v["median"] == 2.5 and site["mode"] == "a" and site["kind"] == "onehot" and city["kind"] == "hashed"
    assert "5 categories > --max-onehot 3" in city["why"]
    new = pa.table({"v": [None, 4.0], "site": ["zzz", None], "city": ["p", "new"], "id": [9, 10]})
    a = apply(t, new, labels=False)
    assert a.x.dtype == np.float32 and a.x.shape == (2, 10)
    assert a.x[:, 0].tolist() == [2.5, 4.0] and a.x[:, 1].tolist() == [1, 0]       # median + indicator
    assert a.x[0, 2:6].tolist() == [0, 0, 1, 0] and a.x[1, 2:6].tolist() == [1, 0, 0, 1]  # other; mode
    for row, value in ((0, "p"), (1, "new")):
        assert a.x[row, 6:].tolist() == np.eye(4)[zlib.crc32(value.encode()) % 4].tolist()
    assert a.unseen == {"site": 1} and a.imputed == {"v": 1, "site": 1} and a.y is None


def test_labels_are_checked_against_the_stated_classes_naming_row_and_value():
    t = pa.table({"f": [1.0, 2.0, 3.0], "label": [0, 1, 7]})
    with pytest.raises(ValueError, match=r"f\.parquet: row 3, column 'label': label 7 is outside the classes "
                                         r"0\.\.4 \(--num-classes 5\)"):
        fit(t, TableOptions(label="label", num_classes=5), where="f.parquet")
    assert fit(t, TableOptions(label="label"))["label"]["num_classes"] == 8   # unstated: max + 1
    text = pa.table({"f": [1.0, 2.0], "label": ["a", "b"]})
    with pytest.raises(ValueError, match="state them with --labels a,b,c"):
        fit(text, TableOptions(label="label", num_classes=2))


# ------------------------------------------------------------------------------ shard a CSV
def test_csv_with_ids_text_labels_categories_and_gaps_shards_like_the_transform_says(tmp_path, capsys):
    df = patients()
    df.to_csv(tmp_path / "p.csv", index=False)
    assert cli(["data", "shard", "--from", str(tmp_path / "p.csv"), "--label", "diagnosis",
                "--out", str(tmp_path / "d"), "--split", "train=0.7,val=0.15,test=0.15"]) == 0
    out = capsys.readouterr().out
    assert "patient_id auto-detected by name" in out and "'site': 3 categories <= --max-onehot 32: one-hot" in out
    assert "label 'diagnosis': 2 classes benign=0, malignant=1" in out
    m = load_manifest(tmp_path / "d" / "train")
    t = m.table
    assert m.schema()["table"] == t and m.num_classes == 2 and m.fields["ids"].shape == (1,)
    assert t["x_columns"] == ["size", "size:missing", "density", "density:missing", "age", "age:missing",
                              "site=east", "site=north", "site=south", f"site={OTHER}", "site:missing"]
    splits = {s: read_split(tmp_path / "d" / s) for s in ("train", "val", "test")}
    assert sum(len(v["y"]) for v in splits.values()) == len(df)          # no row dropped, none twice
    src = df.set_index("patient_id")
    train_ids = splits["train"]["ids"][:, 0]
    # Medians and modes are the *training* split's, as pandas computes them from the source rows.
    assert t["features"][0]["median"] == pytest.approx(src.loc[train_ids, "size"].median())
    assert t["features"][3]["mode"] == src.loc[train_ids, "site"].mode()[0]
    for s in splits.values():
        rows = src.loc[s["ids"][:, 0]]
        assert (np.array(CLASSES)[s["y"]] == rows["diagnosis"].to_numpy()).all()
        size = rows["size"].to_numpy()
        seen = ~np.isnan(size)
        assert np.array_equal(s["x"][seen, 0], size[seen].astype(np.float32))
        assert (s["x"][~seen, 0] == np.float32(t["features"][0]["median"])).all() and (s["x"][:, 1] == ~seen).all()
        onehot = s["x"][:, 6:10]
        assert (onehot.sum(1) == 1).all()
        named = rows["site"].notna().to_numpy()
        assert (np.array(["east", "north", "south", OTHER])[onehot.argmax(1)][named] == rows["site"][named]).all()
    assert m.task == "classification" and m.labeled


def test_parquet_directory_gives_the_rows_the_csv_gives(tmp_path):
    df = patients(300, seed=1)
    df.to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "pq").mkdir()
    df.iloc[:120].to_parquet(tmp_path / "pq" / "part-0.parquet", index=False)
    df.iloc[120:].to_parquet(tmp_path / "pq" / "part-1.parquet", index=False)
    common = ["--label", "diagnosis", "--split", "all=1"]
    assert cli(["data", "shard", "--from", str(tmp_path / "p.csv"), "--out", str(tmp_path / "a"), *common]) == 0
    assert cli(["data", "shard", "--from", str(tmp_path / "pq"), "--out", str(tmp_path / "b"), *common]) == 0
    a, b = read_split(tmp_path / "a" / "all"), read_split(tmp_path / "b" / "all")
    for k in ("x", "y", "ids"):
        assert np.array_equal(a[k], b[k]), k
    assert load_manifest(tmp_path / "a" / "all").table["features"] == load_manifest(tmp_path / "b" / "all").table["features"]


def test_every_split_gets_the_same_classes_even_one_only_the_test_split_has(tmp_path):
    df = patients(200, seed=2, missing=0)
    df.loc[5, "diagnosis"] = "unclear"   # one row of a third class: in one split only
    df.to_csv(tmp_path / "p.csv", index=False)
    assert cli(["data", "shard", "--from", str(tmp_path / "p.csv"), "--label", "diagnosis",
                "--out", str(tmp_path / "d")]) == 0
    ms = {s: load_manifest(tmp_path / "d" / s) for s in ("train", "val", "test")}
    assert {m.num_classes for m in ms.values()} == {3}
    assert sum(m.class_counts[2] for m in ms.values()) == 1
    assert ms["train"].table["label"]["names"] == ["benign", "malignant", "unclear"]


def test_stated_classes_text_and_integers(tmp_path):
    df = patients(100, seed=3, missing=0)
    df.to_csv(tmp_path / "p.csv", index=False)
    assert cli(["data", "shard", "--from", str(tmp_path / "p.csv"), "--label", "diagnosis", "--split", "all=1",
                "--labels", "malignant,benign,unknown", "--out", str(tmp_path / "d")]) == 0
    d = read_split(tmp_path / "d" / "all")
    src = df.set_index("patient_id").loc[d["ids"][:, 0]]
    assert (np.array(["malignant", "benign", "unknown"])[d["y"]] == src["diagnosis"]).all()
    assert load_manifest(tmp_path / "d" / "all").num_classes == 3
    ints = pd.DataFrame({"f": np.arange(30) / 10, "label": np.arange(30) % 3})
    ints.to_csv(tmp_path / "i.csv", index=False)
    assert cli(["data", "shard", "--from", str(tmp_path / "i.csv"), "--num-classes", "5", "--split", "all=1",
                "--out", str(tmp_path / "i")]) == 0
    assert load_manifest(tmp_path / "i" / "all").num_classes == 5


def test_high_cardinality_text_is_hashed_and_drop_policy_drops_rows_with_gaps(tmp_path, capsys):
    rng = np.random.default_rng(4)
    df = pd.DataFrame({"zip": [f"Z{v}" for v in rng.integers(0, 500, 300)], "v": rng.normal(size=300),
                       "label": rng.integers(0, 2, 300)})
    df.loc[[3, 50], "v"] = None
    df.to_csv(tmp_path / "z.csv", index=False)
    assert cli(["data", "shard", "--from", str(tmp_path / "z.csv"), "--split", "all=1", "--hash-buckets", "16",
                "--on-bad-rows", "drop", "--out", str(tmp_path / "d")]) == 0
    assert "> --max-onehot 32: hashed (crc32) into 16 buckets" in capsys.readouterr().out
    m = load_manifest(tmp_path / "d" / "all")
    assert m.fields["x"].shape == (17,) and m.total_samples == 298 and m.bad_rows["dropped"] == 2
    assert "v:missing" not in m.table["x_columns"]


# ------------------------------------------------------------------------------ unlabeled data
def test_a_table_without_a_label_and_hdf5_without_y_make_unlabeled_splits(tmp_path, capsys):
    df = patients(50, seed=5).drop(columns=["diagnosis"])
    df.to_csv(tmp_path / "new.csv", index=False)
    assert cli(["data", "shard", "--from", str(tmp_path / "new.csv"), "--out", str(tmp_path / "u")]) == 0
    assert "an unlabeled split" in capsys.readouterr().out
    m = load_manifest(tmp_path / "u" / "all")       # the default split of an unlabeled table: all=1
    raw = json.loads((tmp_path / "u" / "all" / "manifest.json").read_text())
    assert m.task is None and not m.labeled and raw["labeled"] is False and raw["task"] is None
    assert set(m.fields) == {"x", "ids"} and m.total_samples == 50
    (tmp_path / "h").mkdir()
    with h5py.File(tmp_path / "h" / "lab-a.h5", "w") as f:
        f["features"] = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    assert cli(["data", "index", str(tmp_path / "h"), "--x", "/features"]) == 0
    assert load_manifest(tmp_path / "h").task is None
    assert cli(["data", "index", str(tmp_path / "h"), "--x", "/features", "--task", "classification",
                "--overwrite"]) == 2
    assert "task classification needs --y PATH" in capsys.readouterr().err


# ------------------------------------------------------------------------------ bad input
def _csv(tmp_path, text: str, name: str = "t.csv"):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


BAD = [
    ("f,label\n1,benign\n2,malignant\n", ["--task", "regression"],
     r"t\.csv: label column 'label' holds text, and --task regression needs numbers"),
    ("f,label\n1,benign\n2,malignant\n3,maybe\n", ["--labels", "benign,malignant"],
     r"t\.csv: row 3 \(line 4\), column 'label': label 'maybe' is not one of the classes benign,malignant"),
    ("f,label\n" + "".join(f"{i},{i % 3}\n" for i in range(20)) + "1,10\n2,255\n", ["--num-classes", "10"],
     r"t\.csv: row 21 \(line 22\), column 'label': label 10 is outside the classes 0\.\.9 \(--num-classes 10\)"),
    ("f,label\n1,0\n2,1\n3,-1\n", [], r"t\.csv: row 3 \(line 4\), column 'label': label -1 is negative"),
    ("f,label\n1,0\n2,1.5\n", ["--task", "classification"],
     r"t\.csv: row 2 \(line 3\), column 'label': label 1\.5 is not a class index"),
    ("f,label\n", [], r"t\.csv: no data rows \(only a header\)"),
    ("", [], r"t\.csv: cannot read it as CSV \(Empty CSV file\)"),
    ("f,label\n1,0\n", ["--label", "diagnosis"], r"t\.csv: no column 'diagnosis' \(--label\); columns are \['f', 'label'\]"),
    ("f,label\n1,0\n", ["--id", "patient"], r"t\.csv: no column 'patient' \(--id\)"),
    ("f,label\n" + "".join(f"{i},{i % 2}\n" for i in range(30)) + "n/k,1\n", [],
     r"t\.csv: row 31 \(line 32\), column 'f': 'n/k' is not a number, though 30 of the column's 31 values are"),
    ("f,g,label\n1,a,0\n2,,1\n", ["--on-bad-rows", "error"],
     r"t\.csv: row 2 \(line 3\), column 'g': missing value"),
    ("f,label\n1,0\n2,\n", ["--on-bad-rows", "error"], r"t\.csv: row 2 \(line 3\), column 'label': no label"),
]


@pytest.mark.parametrize("text,args,message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_tables_are_refused_naming_file_row_column_value_and_leave_nothing(tmp_path, capsys, text, args,
                                                                                message):
    path = _csv(tmp_path, text)
    assert cli(["data", "shard", "--from", path, "--out", str(tmp_path / "out"), "--split", "all=1", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_split_left_empty_and_text_in_a_numeric_column_past_the_first_block(tmp_path, capsys, monkeypatch):
    path = _csv(tmp_path, "f,label\n1,0\n2,1\n")
    assert cli(["data", "shard", "--from", path, "--out", str(tmp_path / "out")]) == 2
    assert "leave split(s) " in capsys.readouterr().err and not (tmp_path / "out").exists()
    # Past the first block pyarrow has fixed the column as numbers: the bad cell is still named.
    monkeypatch.setattr(tablefiles, "CSV_BLOCK", 64)
    path = _csv(tmp_path, "f,label\n" + "".join(f"{i},{i % 2}\n" for i in range(40)) + "oops,1\n", "late.csv")
    assert cli(["data", "shard", "--from", path, "--out", str(tmp_path / "out"), "--split", "all=1"]) == 2
    assert "late.csv: row 41 (line 42), column 'f': 'oops' is not a number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_arrays_take_num_classes_too(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(40, 3)), y=np.r_[np.arange(39) % 3, 7])
    assert cli(["data", "shard", "--from", str(tmp_path / "d.npz"), "--num-classes", "3",
                "--out", str(tmp_path / "o")]) == 2
    assert "row 39: label 7 is outside the classes 0..2 (--num-classes 3)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert cli(["data", "shard", "--from", str(tmp_path / "d.npz"), "--out", str(tmp_path / "o")]) == 0
    assert {load_manifest(tmp_path / "o" / s).num_classes for s in ("train", "val", "test")} == {8}
