"""`hpc ensemble train` end to end on real shards, the real trainer and the real registry."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from hpc.cli import main
from hpc.data.reader import iter_shard
from hpc.data.sources import shard_source
from hpc.data.synth import SynthConfig, synth
from hpc.data.writer import WriterConfig
from hpc.ensemble.boosting import residual_targets, samme_round
from hpc.ensemble.member import train_member
from hpc.ensemble.driver import Runner
from hpc.ensemble.spec import load_spec
from hpc.registry import Registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    shard_source("sklearn:digits", root / "digits", split="train=0.8,val=0.1,test=0.1", seed=0,
                 config=WriterConfig(samples_per_shard=500))
    synth(SynthConfig(kind="ratings", samples=3000, users=60, items=40, seed=1), root / "ratings")
    base = {"name": "m", "out_dir": str(root / "runs"), "data": {"dir": str(root / "digits"), "batch_size": 64},
            "model": {"family": "softmax"}, "optim": {"name": "sgd", "lr": 0.02},
            "train": {"epochs": 1, "monitor": "accuracy", "progress": False}}
    (root / "digits.yaml").write_text(yaml.safe_dump(base))
    rbase = dict(base, data={"dir": str(root / "ratings"), "batch_size": 128}, model={"family": "mf",
                 "config": {"dim": 4}}, optim={"name": "adam", "lr": 0.02},
                 train={"epochs": 1, "monitor": "rmse", "progress": False})
    (root / "ratings.yaml").write_text(yaml.safe_dump(rbase))
    return root


def _spec(work, name, **kw):
    data = {"name": name, "base": kw.pop("base", "digits.yaml"), **kw}
    p = work / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _labels(split):
    from hpc.data.manifest import load_manifest

    m = load_manifest(split)
    f = "y" if m.task == "classification" else "rating"
    return np.concatenate([b[f].numpy() for s in range(len(m.shards)) for b in iter_shard(m, s, 4096)])


def test_sample_weights_reach_the_loss(work, tmp_path):
    """Weight 0 on every class-3 row: the member never learns to answer 3 (which the data holds)."""
    y = _labels(work / "digits" / "train")
    np.save(tmp_path / "w.npy", (y != 3).astype(np.float32))
    summary = train_member(str(work / "digits.yaml"), ["name=w0", "data.remainder=pad", "optim.lr=0.1"],
                           {"sample_weights": {"kind": "file", "path": str(tmp_path / "w.npy")},
                            "targets_from": None})
    reg = Registry(tmp_path / "reg")
    v = reg.add(summary["run_dir"], "w0")
    scorer, _ = reg.load_scorer(f"w0@{v}", allow_unpromoted=True)
    b = next(iter_shard(work / "digits" / "test", 0, 1000, normalize=False))
    pred = scorer(scorer.prepare(b)).argmax(1)
    assert (b["y"] == 3).sum() >= 10 and (pred == 3).sum() == 0
    assert float((pred == b["y"]).float().mean()) > 0.5  # it did learn the other classes


def test_bagging_registers_and_rerun_skips(work, capsys):
    spec = _spec(work, "bag", method="bagging", bagging={"members": 3, "combine": "mean"})
    reg_root = work / "reg"
    assert main(["ensemble", "train", str(spec), "--registry", str(reg_root)]) == 0
    out = capsys.readouterr().out
    assert out.count("training (run ens-") == 3 and "ENSEMBLE bagging (bag@1)" in out
    reg = Registry(reg_root)
    card = reg.card("bag@1")
    assert card["ensemble"]["members"] == ["bag-m0@1", "bag-m1@1", "bag-m2@1"]
    # members differ: each trained on its own bootstrap sample with its own seed
    cfgs = [reg.card(f"bag-m{i}@1")["training_config"] for i in range(3)]
    assert len({c["seed"] for c in cfgs}) == 3
    # the registered ensemble scores the test split as the runner reported
    rec = json.loads((work / "runs" / "bag" / "ensemble" / "ensemble.json").read_text())
    scorer, _ = reg.load_scorer("bag@1", allow_unpromoted=True)
    y = _labels(work / "digits" / "test")
    b = next(iter_shard(work / "digits" / "test", 0, 1000, normalize=False))
    acc = float((scorer(scorer.prepare(b)).argmax(1).numpy() == y).mean())
    assert acc == pytest.approx(rec["metrics"]["test"]["ensemble"]["accuracy"])
    # rerun: nothing trains, nothing new is registered
    assert main(["ensemble", "train", str(spec), "--registry", str(reg_root)]) == 0
    out = capsys.readouterr().out
    assert "training (run" not in out and out.count("skipping") == 4
    assert reg.versions("bag") == [1] and reg.versions("bag-m0") == [1]


def test_boosting_samme_weights_follow_the_rounds(work):
    spec = load_spec(_spec(work, "boost", method="boosting", boosting={"rounds": 2}))
    reg = Registry(work / "reg")
    runner = Runner(spec, reg, log=lambda s: None)
    res = runner.run()
    assert [m.ref for m in res.members] == ["boost-r0@1", "boost-r1@1"]
    # round 1 trained on exactly the SAMME weights of round 0's training-split predictions
    r0 = samme_round(runner.y, runner.predict("boost-r0@1", "train").argmax(1), np.ones(runner.n), 10)
    assert res.weights[0] == pytest.approx(r0.alpha)
    cfg = reg.card("boost-r1@1")["training_config"]
    assert cfg["data"]["remainder"] == "pad"
    files = sorted((work / "runs" / "boost" / "ensemble").glob("samme-*.npy"))
    assert any(np.allclose(np.load(f), r0.weights, rtol=1e-6) for f in files)
    assert reg.card("boost@1")["ensemble"]["weights"] == pytest.approx(res.weights)


def test_residual_boosting_on_ratings(work):
    spec = load_spec(_spec(work, "rboost", base="ratings.yaml", method="boosting",
                           boosting={"rounds": 2, "shrinkage": 0.5}))
    runner = Runner(spec, Registry(work / "reg"), log=lambda s: None)
    res = runner.run()
    assert res.weights == [1.0, 0.5]
    f0 = runner.predict(res.members[0].ref, "train")
    want = residual_targets(runner.y, f0)
    files = list((work / "runs" / "rboost" / "ensemble").glob("residual-*.npy"))
    assert any(np.array_equal(np.load(f), want) for f in files)
    # the ensemble's train RMSE is below round 0's: round 1 fitted what round 0 missed
    f1 = runner.predict(res.members[1].ref, "train")
    rmse = lambda p: float(np.sqrt(np.mean((runner.y - p) ** 2)))  # noqa: E731
    assert rmse(f0 + 0.5 * f1) < rmse(f0)


def test_stacking_meta_model_registered(work):
    spec = load_spec(_spec(work, "stack", method="stacking", stacking={"folds": 2, "meta": {"epochs": 100}}))
    reg = Registry(work / "reg")
    runner = Runner(spec, reg, log=lambda s: None)
    res = runner.run()
    assert res.groups == [[0, 1]]
    card = reg.card("stack@1")
    assert card["ensemble"]["method"] == "stacking" and card["ensemble"]["meta"]["in_dim"] == 10
    scorer, _ = reg.load_scorer("stack@1", allow_unpromoted=True)
    b = next(iter_shard(work / "digits" / "test", 0, 1000, normalize=False))
    y = _labels(work / "digits" / "test")
    acc = float((scorer(scorer.prepare(b)).argmax(1).numpy() == y).mean())
    assert acc == pytest.approx(res.metrics["test"]["ensemble"]["accuracy"])
    # `hpc infer --model stack@1` in a fresh process on 2 ranks: level-0 fold members, then the
    # meta-model, one pass; pandas reads what the runner reported; a rerun leaves it untouched
    out = work / "stack-preds"
    cmd = [sys.executable, "-m", "hpc", "infer", "--model", "stack@1", "--registry", str(reg.root),
           "--input", str(work / "digits" / "test"), "--output", str(out), "--allow-unpromoted", "--nproc", "2"]
    for attempt in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        if attempt == 0:
            first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == first
    df = pd.read_parquet(out).sort_values(["shard", "index"])
    assert len(df) == len(y) and float((df["prediction"].to_numpy() == y).mean()) == pytest.approx(acc)
    assert set(df["model"]) == {"stack"} and set(df["model_version"]) == {1}
    # rerun: every fold member found, the same meta-model refitted, no new ensemble version
    again = Runner(spec, reg, log=lambda s: None).run()
    assert not any(m.trained for m in again.members) and again.ensemble_ref == "stack@1"
    assert reg.versions("stack") == [1]


@pytest.mark.mpi
def test_bootstrap_members_on_two_ranks(work):
    """Weighted members train on N ranks: the hook travels as trainer config keys."""
    spec = load_spec(_spec(work, "mpibag", method="bagging", bagging={"members": 2}))
    reg = Registry(work / "reg")
    res = Runner(spec, reg, nproc=2, log=lambda s: None).run()
    cards = [reg.card(m.ref) for m in res.members]
    assert [c["lineage"]["world_size"] for c in cards] == [2, 2]
    assert [c["training_config"]["data"]["sample_weights"] for c in cards] == [
        {"kind": "bootstrap", "seed": 0}, {"kind": "bootstrap", "seed": 1}]


def test_preempted_member_resumes_on_rerun_exactly(work, tmp_path):
    """SIGUSR2 mid-member: the member checkpoints, `hpc ensemble train` exits 3 with nothing
    half-trained registered; the rerun skips the registered member, resumes the interrupted one,
    and ends with the weights of an uninterrupted run."""
    import re
    import signal

    from safetensors.torch import load_file

    spec = _spec(work, "pre", method="bagging", bagging={"members": 2})
    cmd = [sys.executable, "-m", "hpc", "ensemble", "train", str(spec), "train.epochs=30",
           "train.log_every=10", "train.progress=true"]
    reg_a = tmp_path / "reg-a"
    # A progress line on every step (HPC_PROGRESS_S=0), so the signal lands mid-member.
    proc = subprocess.Popen(cmd + [f"out_dir={tmp_path / 'a'}", "--registry", str(reg_a)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HPC_PROGRESS_S": "0"})
    seen, in_m1 = [], False
    for line in proc.stdout:
        seen.append(line)
        in_m1 = in_m1 or "pre-m1: training" in line
        m = re.search(r"step ([\d,]+)/", line)
        if in_m1 and m and int(m.group(1).replace(",", "")) >= 100:
            proc.send_signal(signal.SIGUSR2)
            break
    seen += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 3, "".join(seen)[-3000:]
    out = "".join(seen)
    assert "pre-m1: preempted" in out
    reg = Registry(reg_a)
    assert reg.versions("pre-m0") == [1] and reg.versions("pre-m1") == [] and reg.versions("pre") == []

    r = subprocess.run(cmd + [f"out_dir={tmp_path / 'a'}", "--registry", str(reg_a)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    both = r.stdout + r.stderr
    assert "pre-m0: registered as pre-m0@1" in both and "resumed from" in both
    assert reg.versions("pre-m1") == [1] and reg.versions("pre") == [1]

    # the same member, never interrupted
    r = subprocess.run(cmd + [f"out_dir={tmp_path / 'b'}", "--registry", str(tmp_path / "reg-b")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(next((reg_a / "pre-m1").glob("*/model.safetensors"))))
    want = load_file(str(next((tmp_path / "reg-b" / "pre-m1").glob("*/model.safetensors"))))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
