"""Regression built in: mlp and linear train real-valued targets in standardized units (the training
split's mean/std), predict in the target's own units, and `hpc infer` writes those units.

End to end on scikit-learn's diabetes (`hpc data shard --from sklearn:diabetes`): the mlp's test
RMSE next to predicting the training mean and next to scikit-learn's Ridge on the same split, and
the registered model's `hpc infer` predictions equal to the trainer's evaluation.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from hpc.cli import main
from hpc.data import load_manifest
from hpc.data.reader import iter_shard
from hpc.dist.comm import LocalComm
from hpc.models import build_model, task_of
from hpc.registry import Registry
from hpc.train import run
from hpc.train.losses import per_sample_loss
from hpc.train.metrics import MetricSums

SCHEMA = {"task": "regression", "fields": {"x": {"dtype": "float32", "shape": [4]}, "y": {"dtype": "float32", "shape": []}},
          "target": {"mean": 150.0, "std": 80.0}}


# ------------------------------------------------------------------------------- units
@pytest.mark.parametrize("family", ["mlp", "linear"])
def test_regression_models_predict_in_target_units_and_learn_standardized(family):
    torch.manual_seed(0)
    model = build_model(family, {}, SCHEMA)
    assert model.task == "regression"
    x = torch.randn(6, 4)
    pred = model({"x": x})
    assert pred.shape == (6,)
    # The head's standardized output z, mapped to the target's units: pred = z * std + mean.
    head = model.head if family == "mlp" else model.linear
    z = (head(model.blocks(x)) if family == "mlp" else head(x))[:, 0]
    torch.testing.assert_close(pred, z * 80.0 + 150.0)
    # The loss is the squared error in standardized units: a 80-unit miss costs 1.
    y = pred.detach() + 80.0
    loss = per_sample_loss(model, "regression", pred, {"y": y})
    torch.testing.assert_close(loss, torch.ones(6))
    # Not in the weights: the card's schema is the one record of the scaling.
    assert not any("mean" in k or "std" in k for k in model.state_dict())


def test_mlp_trains_the_datas_task_and_wrong_families_are_named():
    assert task_of("mlp") == "classification" and task_of("mlp", "regression") == "regression"
    assert task_of("linear") == "regression"
    clf = build_model("mlp", {"widths": [8]}, {**SCHEMA, "task": "classification", "num_classes": 3})
    assert clf({"x": torch.randn(2, 4)}).shape == (2, 3) and clf.task == "classification"
    with pytest.raises(ValueError, match=r"'logistic' trains classification, but the data's task is regression; "
                                         r"families for regression: .*linear.*mlp"):
        build_model("logistic", {}, SCHEMA)
    with pytest.raises(ValueError, match="families for ratings: mf"):
        task_of("linear", "ratings")


def test_regression_metrics_report_the_training_mean_baseline():
    sums = MetricSums("regression", target_mean=10.0)
    y = torch.tensor([8.0, 12.0, 10.0, 99.0])
    sums.update(torch.tensor([9.0, 11.0, 10.0, 0.0]), y, torch.zeros(4), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    m = sums.reduce(LocalComm())
    assert m["rmse"] == pytest.approx(math.sqrt(2 / 3)) and m["rmse_train_mean"] == pytest.approx(math.sqrt(8 / 3))
    assert "rmse_train_mean" not in MetricSums("regression").reduce(LocalComm())


# ------------------------------------------------------------------------------- diabetes end to end
def _split(d) -> tuple[np.ndarray, np.ndarray]:
    m = load_manifest(d)
    xs, ys = [], []
    for i in range(len(m.shards)):
        for b in iter_shard(m, i, 1024, normalize=False):
            xs.append(b["x"].double().numpy())
            ys.append(b["y"].double().numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _rmse(pred, y) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - y) ** 2)))


def test_diabetes_mlp_beats_the_mean_matches_ridge_and_infer_writes_target_units(tmp_path, monkeypatch, capsys):
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    monkeypatch.chdir(tmp_path)
    assert main(["data", "shard", "--from", "sklearn:diabetes", "--out", "data"]) == 0
    assert load_manifest("data/train").task == "regression"
    (xt, yt), (xe, ye) = _split("data/train"), _split("data/test")
    mean_rmse = _rmse(np.full_like(ye, yt.mean()), ye)
    mu, sd = xt.mean(0), xt.std(0)  # Ridge on the inputs as the models see them (training statistics)
    ridge = sklearn_linear.Ridge(alpha=1.0).fit((xt - mu) / sd, yt)
    ridge_rmse = _rmse(ridge.predict((xe - mu) / sd), ye)

    cfg = {"name": "diabetes", "out_dir": "runs", "seed": 0, "data": {"dir": "data", "batch_size": 32},
           "model": {"family": "mlp", "config": {"widths": [64]}},
           "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.05},
           "train": {"epochs": 80, "patience": 10, "monitor": "rmse", "progress": False},
           "registry": {"name": "diabetes", "alias": "production", "root": "registry"}}
    summary = run(cfg, ["run_id=mlp"])
    test = summary["metrics"]["test"]
    lin = run(cfg, ["run_id=linear", "model.family=linear", "model.config={}", "registry=null",
                    "optim.lr=0.01", "optim.weight_decay=0"])["metrics"]["test"]
    table = (f"\ndiabetes test RMSE ({len(ye)} rows, target std {yt.std():.1f}):\n"
             f"  predict the training mean  {mean_rmse:8.3f}\n  scikit-learn Ridge(1.0)   {ridge_rmse:8.3f}\n"
             f"  hpc linear                 {lin['rmse']:8.3f}\n  hpc mlp [64]               {test['rmse']:8.3f}\n")
    # The trainer reports the mean predictor itself, computed from the training split's statistics.
    assert test["rmse_train_mean"] == pytest.approx(mean_rmse, rel=1e-5)
    assert test["rmse"] <= 1.1 * ridge_rmse and lin["rmse"] <= 1.1 * ridge_rmse, table
    assert test["rmse"] <= 0.8 * mean_rmse, table

    card = Registry("registry").card("diabetes@production")
    target = card["normalization"]["target"]
    assert target == card["schema"]["target"]
    assert target["mean"] == pytest.approx(yt.mean(), rel=1e-5) and target["std"] == pytest.approx(yt.std(), rel=1e-4)

    capsys.readouterr()
    assert main(["infer", "--model", "diabetes@production", "--input", "data/test", "--output", "preds",
                 "--registry", "registry"]) == 0
    df = pd.read_parquet("preds").sort_values("row_id")
    pred = df["prediction"].to_numpy(np.float64)
    assert len(pred) == len(ye) and abs(pred.mean() - ye.mean()) < 0.5 * ye.std()  # target units, not z
    assert _rmse(pred, ye) == pytest.approx(test["rmse"], rel=1e-5)
    with capsys.disabled():
        print(table)  # pytest -s shows the comparison
