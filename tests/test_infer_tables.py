"""Tables end to end: a hospital's CSV (scikit-learn's breast_cancer with a patient id, a text
diagnosis, a site column and 5 % empty cells) -> `hpc data shard` -> `hpc train` -> `hpc infer` of an
UNLABELED CSV of held-out patients, and scoring Parquet/CSV files directly, exactly once.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from hpc.cli import main as cli
from hpc.data import load_manifest

sk = pytest.importorskip("sklearn")
from sklearn.compose import make_column_transformer  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402
from sklearn.impute import SimpleImputer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import OneHotEncoder, StandardScaler  # noqa: E402


def hospital_table(seed: int = 0) -> pd.DataFrame:
    b = load_breast_cancer(as_frame=True)
    rng = np.random.default_rng(seed)
    n = len(b.data)
    df = b.data.mask(rng.random(b.data.shape) < 0.05)              # 5 % of the cells empty
    df.insert(0, "patient_id", (100000 + rng.permutation(n)).astype("int64"))
    df["site"] = rng.choice(["north", "south", "east", "west"], n)
    df.loc[rng.random(n) < 0.05, "site"] = None
    df["diagnosis"] = np.where(b.target == 0, "malignant", "benign")
    return df


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    df = hospital_table()
    rng = np.random.default_rng(1)
    held = np.zeros(len(df), bool)
    held[rng.permutation(len(df))[: len(df) // 5]] = True
    df[~held].to_csv(root / "labeled.csv", index=False)
    df[held].drop(columns=["diagnosis"]).to_csv(root / "new.csv", index=False)   # no label column
    assert cli(["data", "shard", "--from", str(root / "labeled.csv"), "--label", "diagnosis",
                "--out", str(root / "data"), "--split", "train=0.85,val=0.15"]) == 0
    assert cli(["train", "tabular_mlp", f"data.dir={root / 'data'}", f"out_dir={root / 'runs'}",
                "registry.name=bc", "registry.alias=production", f"registry.root={root / 'reg'}",
                "train.progress=false"]) == 0
    return {"root": root, "df": df, "held": held, "reg": str(root / "reg")}


def infer(world, inp, out, *extra) -> int:
    return cli(["infer", "--model", "bc@production", "--registry", world["reg"], "--input", str(inp),
                "--output", str(out), *extra])


def sklearn_accuracy(df: pd.DataFrame, held: np.ndarray) -> float:
    feats = [c for c in df.columns if c not in ("patient_id", "diagnosis", "site")]
    pre = make_column_transformer(
        (make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler()), feats),
        (make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")), ["site"]))
    clf = make_pipeline(pre, LogisticRegression(max_iter=5000)).fit(df[~held], df[~held]["diagnosis"])
    return float((clf.predict(df[held]) == df[held]["diagnosis"]).mean())


def test_unlabeled_csv_is_scored_with_ids_and_label_names_as_well_as_sklearn(world, tmp_path, capsys):
    out = tmp_path / "pred"
    assert infer(world, world["root"] / "new.csv", out) == 0
    df = pd.read_parquet(out)
    assert list(df.columns) == ["shard", "index", "row_id", "patient_id", "prediction", "prediction_label",
                                "probabilities", "model", "model_version"]
    truth = world["df"][world["held"]].set_index("patient_id")["diagnosis"]
    assert sorted(df["patient_id"]) == sorted(truth.index) and len(df) == len(truth)   # every row, its id
    assert set(df["prediction_label"]) <= {"benign", "malignant"}
    assert (np.array(["benign", "malignant"])[df["prediction"]] == df["prediction_label"]).all()
    ours = float((df.set_index("patient_id")["prediction_label"] == truth).mean())
    baseline = sklearn_accuracy(world["df"], world["held"])
    with capsys.disabled():
        print(f"\nheld-out accuracy: hpc tabular_mlp {ours:.4f}, scikit-learn LogisticRegression {baseline:.4f} "
              f"({len(truth)} patients)")
    assert ours >= baseline - 0.02
    man = json.loads((out / "_MANIFEST.json").read_text())
    assert man["input"]["kind"] == "files" and man["partitions"][0]["input"] == "new.csv"
    held = world["df"][world["held"]]
    assert man["table"]["imputed_cells"]["mean radius"] == int(held["mean radius"].isna().sum())
    assert man["table"]["unseen_categories"] == {}
    # The card carries the transform (label names, medians, categories) and the schema check ignores y.
    card = json.loads((world["root"] / "reg" / "bc" / "1" / "model.json").read_text())
    assert card["schema"]["table"]["label"]["names"] == ["benign", "malignant"]


def test_files_and_shards_made_with_the_transform_give_identical_predictions_exactly_once(world, tmp_path):
    root = world["root"]
    new = pd.read_csv(root / "new.csv")
    (tmp_path / "drops").mkdir()   # the rows the shards below hold, so the batches are the same
    for name, a in (("a", 0), ("b", 50), ("c", 100)):
        new.iloc[a:a + 50].to_parquet(tmp_path / "drops" / f"{name}.parquet", index=False)
    assert cli(["data", "shard", "--from", str(root / "new.csv"), "--transform", str(root / "data" / "train"),
                "--out", str(tmp_path / "shards"), "--samples-per-shard", "50"]) == 0
    assert not load_manifest(tmp_path / "shards" / "all").labeled
    assert infer(world, tmp_path / "drops", tmp_path / "p1", "--batch-size", "16") == 0
    assert infer(world, tmp_path / "shards" / "all", tmp_path / "p2", "--batch-size", "16") == 0
    a, b = pd.read_parquet(tmp_path / "p1"), pd.read_parquet(tmp_path / "p2")
    assert sorted(p.name for p in (tmp_path / "p1").glob("part-*")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert list(a["patient_id"]) == list(new["patient_id"]) == list(b["patient_id"])
    assert np.array_equal(np.stack(a["probabilities"]), np.stack(b["probabilities"]))      # exact
    assert list(a["row_id"]) == list(range(len(new))) and list(a["index"][:52]) == list(range(50)) + [0, 1]
    # Exactly once: a rerun does nothing; a lost partition is rewritten with the same bytes.
    before = {p.name: p.read_bytes() for p in (tmp_path / "p1").glob("part-*")}
    assert infer(world, tmp_path / "drops", tmp_path / "p1", "--batch-size", "16") == 0
    (tmp_path / "p1" / "part-00001.parquet").unlink()
    (tmp_path / "p1" / "_SUCCESS").unlink()
    assert infer(world, tmp_path / "drops", tmp_path / "p1", "--batch-size", "16") == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "p1").glob("part-*")} == before
    # Another input (a drop changed) is another job: refused without --overwrite.
    new.iloc[:40].to_parquet(tmp_path / "drops" / "a.parquet", index=False)
    assert infer(world, tmp_path / "drops", tmp_path / "p1", "--batch-size", "16") == 2


def test_unseen_categories_and_empty_cells_are_counted(world, tmp_path):
    new = pd.read_csv(world["root"] / "new.csv").iloc[:30].copy()
    new.loc[:4, "site"] = "moon"          # never seen in training: the site=<other> column
    new.loc[:9, "mean texture"] = None
    new.to_csv(tmp_path / "odd.csv", index=False)
    assert infer(world, tmp_path / "odd.csv", tmp_path / "p") == 0
    man = json.loads((tmp_path / "p" / "_MANIFEST.json").read_text())
    assert man["table"]["unseen_categories"] == {"site": 5}
    assert man["table"]["imputed_cells"]["mean texture"] == 10
    assert len(pd.read_parquet(tmp_path / "p")) == 30


def test_bad_inputs_to_infer_and_train_are_refused_by_name(world, tmp_path, capsys):
    new = pd.read_csv(world["root"] / "new.csv")
    new.drop(columns=["mean area"]).to_csv(tmp_path / "short.csv", index=False)
    assert infer(world, tmp_path / "short.csv", tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert "short.csv: missing column(s) ['mean area']" in err and not (tmp_path / "p").exists()
    assert infer(world, tmp_path / "short.csv", tmp_path / "p", "--nproc", "2") == 2   # before ranks start
    assert "missing column(s) ['mean area']" in capsys.readouterr().err and not (tmp_path / "p").exists()
    # Shards of the new rows with a transform fitted on them (not the model's): refused, said why.
    assert cli(["data", "shard", "--from", str(world["root"] / "new.csv"), "--out", str(tmp_path / "own")]) == 0
    assert infer(world, tmp_path / "own" / "all", tmp_path / "p") == 2
    assert "encoded by another table transform than the model bc@1's" in capsys.readouterr().err
    # Training on an unlabeled split is refused naming it, before any rank starts.
    assert cli(["train", "tabular_mlp", f"data.train={tmp_path / 'own' / 'all'}", f"out_dir={tmp_path / 'r'}"]) == 2
    assert f"{tmp_path / 'own' / 'all'}: an unlabeled split" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bench_infer_adds_the_table_row(world, tmp_path, capsys):
    root = world["root"]
    shutil.copy(root / "new.csv", tmp_path / "new.csv")
    assert cli(["data", "shard", "--from", str(root / "new.csv"), "--transform", str(root / "data" / "train"),
                "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert cli(["bench", "infer", "--model", "bc@production", "--registry", world["reg"], "--input",
                str(tmp_path / "s" / "all"), "--table", str(tmp_path / "new.csv"), "--nproc", "", "--repeats", "1",
                "--json", str(tmp_path / "b.json")]) == 0
    assert "hpc infer job from table files: scoring phase" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["table_vs_shards"] > 0
