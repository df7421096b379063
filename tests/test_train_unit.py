"""Trainer pieces in one process: config validation, schedules, metrics, checkpoints, CLI exit codes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from hpc.dist.comm import LocalComm
from hpc.train.checkpoint import Checkpoints, flatten_state, unflatten_state
from hpc.train.config import OptimConfig, TrainConfig, apply_overrides, load_config
from hpc.train.metrics import MetricSums, auc_from_histograms
from hpc.train.optim import lr_at

BASE = {"data": {"dir": "d"}, "model": {"family": "softmax"}}


# -- config ---------------------------------------------------------------------------------------

def test_config_defaults_overrides_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ndata: {dir: d, batch_size: 8}\nmodel: {family: mlp, config: {widths: [4]}}\n")
    cfg = load_config(p, ["optim.lr=0.05", "model.config.dropout=0.1", "train.precision=bf16",
                          "registry.name=m"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 0.05 and cfg.data.batch_size == 8 and cfg.train.precision == "bf16"
    assert cfg.model.config == {"widths": [4], "dropout": 0.1} and cfg.registry.name == "m"
    assert load_config(cfg.to_dict()).to_dict() == cfg.to_dict()  # round trip
    assert load_config("digits_cnn").model.family == "cnn"         # shipped config by name


@pytest.mark.parametrize("override,match", [
    (["optim.lrr=1"], r"config\.optim: unknown key 'lrr' in override 'optim.lrr=1'; did you mean optim\.lr\? "
                      r"valid keys: .*lr"),
    (["optim.lr=-1"], r"config\.optim\.lr: must be > 0, got -1"),
    (["optim.name=lamb"], r"config\.optim\.name: 'lamb' is not one of 'sgd', 'adam', 'adamw'"),
    (["data.batch_size=many"], r"config\.data\.batch_size: expected an integer, got 'many'"),
    (["train.epochs=0"], r"config\.train\.epochs: must be >= 1"),
    (["optim.nesterov=true"], r"nesterov: needs name=sgd and momentum > 0"),
    (["model.config.widths=[4]"], r"config\.model\.config: unknown key 'widths'; valid keys: input"),
    (["kernels=fast"], r"'fast' is not one of 'auto', 'torch', 'cupy'"),
    (["optim.fused=fast"], r"config\.optim\.fused: 'fast' is not a valid value; expected bool \| 'auto' \| 'cupy'"),
    (["optim.fused=cupy", "optim.weight_decay=0.1"], r"optim\.fused: .* with fused: cupy"),
    (["monitor.hang_s=400"], r"monitor\.hang_s: must be below dist\.timeout_s=300"),
    (["lr"], r"expected key=value"),
    # an optional section (`X | None`) reports its own error, not "expected mapping | null"
    (["registry.root=/r"], r"config\.registry\.name: is required when registry is set"),
    (["registry={name: a, rooot: /r}"], r"config\.registry: unknown key 'rooot'; did you mean 'root'\? "
                                         r"valid keys: .*root"),
])
def test_bad_config_names_key_and_valid_values(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(BASE, override)


def test_checks_against_the_world_are_written_once():
    from hpc.train.checks import check_precision, per_rank_batch

    assert per_rank_batch(64, 4) == 16
    with pytest.raises(ValueError, match=r"data\.batch_size=64 \(the global batch\) is not divisible by the 3 ranks"):
        per_rank_batch(64, 3)
    check_precision("bf16", cuda=False)
    with pytest.raises(ValueError, match="train.precision=fp16 needs a CUDA GPU"):
        check_precision("fp16", cuda=False)


def test_config_hash_ignores_names_and_paths_only():
    a = load_config(BASE)
    assert a.hash() == load_config(BASE, ["name=other", "out_dir=/x", "train.log_every=3"]).hash()
    assert a.hash() != load_config(BASE, ["optim.lr=0.2"]).hash()


def test_apply_overrides_creates_nested_keys():
    # values stay text (Raw) until the field they land in gives them a type
    assert apply_overrides({"a": 1}, ["b.c.d=[1, 2]", "a=x"]) == {"a": "x", "b": {"c": {"d": ["1", "2"]}}}


@pytest.mark.parametrize("fused,step", [(False, "torch.optim"), (True, "torch"), ("auto", "torch"),
                                        ("torch", "torch")])
def test_optim_fused_picks_the_optimizer_and_its_step_path(monkeypatch, fused, step):
    from hpc.models import ops
    from hpc.train.optim import build_optimizer

    monkeypatch.setattr(ops, "_mode", "torch")
    opt = build_optimizer(torch.nn.Linear(3, 2), OptimConfig(name="adamw", lr=0.1, fused=fused))
    assert getattr(opt, "kernel_path", "torch.optim") == step
    assert isinstance(opt, ops.FusedAdam) == (fused is not False)


def test_optim_fused_cupy_without_cupy_says_why(monkeypatch):
    """optim.fused=cupy pins the optimizer to the kernel; where it cannot run, the error says why."""
    from hpc.models import ops
    from hpc.train.optim import build_optimizer

    monkeypatch.setattr(ops, "_cupy_reason", "CUDA is not available to PyTorch (test)")
    with pytest.raises(ValueError, match=r"optim\.fused='cupy': FusedSGD: kernels='cupy' cannot run here: "
                                         r"CUDA is not available to PyTorch \(test\); use kernels='auto' or 'torch'"):
        build_optimizer(torch.nn.Linear(3, 2), OptimConfig(fused="cupy"))


# -- schedules (pure) -------------------------------------------------------------------------------

def test_warmup_then_cosine_reaches_min_lr():
    cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=4, min_lr=0.1)
    lrs = [lr_at(s, cfg, total_steps=104) for s in range(105)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and math.isclose(lrs[54], 0.55) and math.isclose(lrs[104], 0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_step_schedule_and_linear_scaling():
    cfg = OptimConfig(lr=0.1, schedule="step", step_size=10, gamma=0.5, lr_scaling="linear")
    assert lr_at(0, cfg, 100, world_size=4) == pytest.approx(0.4)
    assert lr_at(25, cfg, 100, world_size=4) == pytest.approx(0.1)
    assert lr_at(25, OptimConfig(lr=0.1), 100, world_size=4) == 0.1


# -- metrics ---------------------------------------------------------------------------------------

def test_auc_from_histograms_matches_pairwise_count():
    rng = np.random.default_rng(0)
    scores, labels = rng.random(500), rng.random(500) < 0.4
    pos = torch.from_numpy(np.histogram(scores[labels], bins=4096, range=(0, 1))[0]).double()
    neg = torch.from_numpy(np.histogram(scores[~labels], bins=4096, range=(0, 1))[0]).double()
    exact = np.mean(scores[labels][:, None] > scores[~labels][None, :])
    assert abs(auc_from_histograms(pos, neg) - exact) < 1e-3


def test_metric_sums_ignore_padding():
    m = MetricSums("classification", 10)
    # Scores fall with the distance from the predicted class: top-5 of class 2 is {0, 1, 2, 3, 4}.
    logits = -(torch.arange(10.0)[None, :] - torch.tensor([1.0, 2.0, 2.0, 4.0])[:, None]) ** 2
    y = torch.tensor([1, 2, 0, 9])
    m.update(logits, y, torch.tensor([0.1, 0.2, 0.3, 99.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    out = m.reduce(LocalComm())
    assert out["samples"] == 3 and out["accuracy"] == pytest.approx(2 / 3)
    assert out["loss"] == pytest.approx(0.2, rel=1e-6) and out["top5"] == 1.0
    r = MetricSums("ratings")
    r.update(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]), torch.zeros(2), torch.ones(2))
    assert r.reduce(LocalComm())["rmse"] == pytest.approx(math.sqrt(0.5))


# -- checkpoints (one rank) ---------------------------------------------------------------------

def test_optimizer_state_roundtrips_through_flat_tensors():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors: dict = {}
    tree = json.loads(json.dumps(flatten_state(opt.state_dict(), tensors)))
    back = unflatten_state(tree, tensors)
    assert set(back["state"]) == {0, 1}  # int keys survive JSON
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(back)
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state[model.weight]["exp_avg"])


def _save(ck, step, model, opt):
    ck.save(step, model, opt, {"step": step}, {"reader": {"batch": step}})


def test_checkpoints_keep_last_k_and_fall_back_past_a_damaged_one(tmp_path, caplog):
    ck = Checkpoints(tmp_path / "ck", LocalComm(), keep=2)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    weights = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.add_(1.0)
        weights[step] = model.weight.detach().clone()
        _save(ck, step, model, opt)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["latest", "step-000000002", "step-000000003"]
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step-000000003"
    # Truncate the newest model file: the previous checkpoint is used, and the damage named.
    f = tmp_path / "ck" / "step-000000003" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with caplog.at_level("ERROR", logger="hpc.train"):
        path = ck.choose()
    assert path.name == "step-000000002"
    assert "step-000000003" in caplog.text and "model.safetensors: checksum mismatch" in caplog.text
    shared, mine = ck.load(path, model, opt)
    assert shared["step"] == 2 and mine["reader"] == {"batch": 2}
    torch.testing.assert_close(model.weight, weights[2], rtol=0, atol=0)


def test_train_state_reads_and_writes_the_checkpoint_keys_of_older_checkpoints():
    from hpc.train.state import TrainState

    # The `shared` dict of a checkpoint's meta.json as the trainer has always written it.
    shared = {"step": 17, "epoch": 1, "batch_in_epoch": 4, "last_val_step": 15, "config_hash": "abc",
              "best": {"value": 0.5, "step": 15, "metrics": {"loss": 0.5}}, "evals_since_best": 1,
              "nonfinite_run": 0, "scaler": None}
    s = TrainState()
    s.load_state_dict(shared)
    assert s.position == (17, 1, 4) and s.best["step"] == 15 and s.evals_since_best == 1
    assert {**s.state_dict(), "config_hash": "abc", "scaler": None} == shared
    s.state_dict()["best"]["metrics"]["loss"] = 9.0   # a copy: the live state is not aliased
    assert s.best["metrics"]["loss"] == 0.5


def test_rng_states_restored(tmp_path):
    ck = Checkpoints(tmp_path, LocalComm(), keep=1)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    import random

    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    _save(ck, 1, model, opt)
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(10), np.random.rand(10), random.random()
    ck.load(ck.choose(), model, opt)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


# -- CLI: a bad config exits 2 before any rank starts -----------------------------------------------

@pytest.mark.parametrize("extra", [[], ["--nproc", "2"]])
def test_cli_bad_config_exits_2_naming_the_key(tmp_path, extra):
    p = tmp_path / "bad.yaml"
    p.write_text("data: {dir: nowhere}\nmodel: {family: softmax}\noptim: {lr: 0.1, momentun: 0.9}\n")
    r = subprocess.run([sys.executable, "-m", "hpc", "train", str(p), *extra], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "unknown key 'momentun'" in r.stderr and "momentum" in r.stderr and str(p) in r.stderr
    assert not (tmp_path / "runs").exists()
    r = subprocess.run([sys.executable, "-m", "hpc", "train", "digits_softmax", "data.dir=nowhere", *extra],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "no manifest" in r.stderr, r.stderr


def test_nproc_may_come_anywhere_on_the_command_line():
    from hpc.cli.train import split_options

    assert split_options(["a=1", "--nproc", "2", "b=2"], None) == (["a=1", "b=2"], 2, False)
    assert split_options(["--nproc=4", "--print-config"], 1) == ([], 4, True)
    with pytest.raises(ValueError, match="--nproc 'x'"):
        split_options(["--nproc", "x"], None)
    with pytest.raises(ValueError, match="unknown option '--np'"):
        split_options(["--np", "2"], None)


# -- one process, end to end: run() -> summary, models, registry --------------------------------

def test_run_in_process_writes_the_run_directory_contract_and_registers(tmp_path):
    from hpc.data import SynthConfig, synth
    from hpc.registry import Registry
    from hpc.train import run

    synth(SynthConfig(kind="tabular", samples=300, features=6, classes=3, seed=1), tmp_path / "d",
          split="train=0.8,val=0.1,test=0.1")
    cfg = {"name": "unit", "out_dir": str(tmp_path / "runs"), "data": {"dir": str(tmp_path / "d"), "batch_size": 20},
           "model": {"family": "mlp", "config": {"widths": [8]}}, "optim": {"name": "adamw", "lr": 0.01},
           "train": {"epochs": 3, "eval_every": 5, "patience": 50, "progress": False},
           "registry": {"name": "unit-model", "alias": "staging", "root": str(tmp_path / "reg")}}
    s = run(cfg, ["train.log_every=4"])
    run_dir = tmp_path / "runs" / "unit" / s["run_dir"].rsplit("/", 1)[1]
    assert s["state"] == "completed" and s["step"] == 36 and s["world_size"] == 1 and s["backend"] == "local"
    for key in ("model", "data", "metrics", "samples_per_s", "wall_s", "versions", "code_version", "slurm"):
        assert key in s, key
    assert s["data"]["manifest_sha256"] and s["data"]["schema"]["num_classes"] == 3
    assert {"loss", "accuracy", "samples"} <= set(s["metrics"]["val"]) and s["metrics"]["test"]["samples"] == 30
    assert json.loads((run_dir / "summary.json").read_text())["registry"]["version"] == 1
    for f in ("models/best.safetensors", "models/last.safetensors", "config.yaml", "logs/rank-0.log"):
        assert (run_dir / f).is_file()
    vals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in vals if r["kind"] == "val"] == [5, 10, 15, 20, 25, 30, 35, 36]
    assert Registry(tmp_path / "reg").resolve("unit-model@staging").version == 1
    hb = json.loads((run_dir / "heartbeat" / "rank-0.json").read_text())  # for hpc status / report
    assert hb["state"] == "completed" and hb["step"] == 36
    # The last validation (step 36, after max_steps, between eval_every points) counts as eval time.
    assert [e[3] for e in hb["events"] if e[0] == "eval"] == [5, 10, 15, 20, 25, 30, 35, 36]
    # The same run_id again without resume is refused (it would mix two runs' checkpoints).
    with pytest.raises(ValueError, match="already has checkpoints; pass resume=auto"):
        run(cfg, [f"run_id={run_dir.name}"])


def test_the_launch_layer_requeues_a_preempted_run_and_says_so_in_the_run_log(monkeypatch, tmp_path, capsys):
    """The trainer only reports "preempted"; hpc.launch.tasks.run_training (hpc train, the submitted
    train task) has rank 0 requeue the Slurm job and writes the line into the run's log."""
    import hpc.train
    from hpc.launch import tasks

    seen = {}

    def fake_run(config, overrides, on_hang=None):
        seen["on_hang"] = on_hang
        return {"state": "preempted", "step": 12, "run_dir": str(tmp_path),
                "preemption": {"signal": "SIGUSR2", "checkpoint_s": 0.5}}

    monkeypatch.setattr(hpc.train, "run", fake_run)
    monkeypatch.setattr(tasks, "requeue_after_preemption",
                        lambda world, checkpoint_s: f"requeued Slurm job {world.slurm_job_id} ({checkpoint_s}s)")
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    s = tasks.run_training("cfg.yaml")
    assert callable(seen["on_hang"])   # monitor.on_hang=requeue has the launcher's requeue to call
    assert s["preemption"]["requeue"] == "requeued Slurm job 4242 (0.5s)"
    line = "preempted by SIGUSR2 at step 12: checkpoint written; requeued Slurm job 4242"
    assert line in capsys.readouterr().err and line in (tmp_path / "logs" / "rank-0.log").read_text()
    monkeypatch.delenv("SLURM_JOB_ID")  # outside Slurm there is nothing to requeue
    tasks.run_training("cfg.yaml")
    assert seen["on_hang"] is None


@pytest.mark.parametrize("on_hang", ["requeue", "exit"])
def test_the_watchdog_calls_the_launchers_on_hang_only_for_monitor_on_hang_requeue(tmp_path, on_hang):
    from hpc.train.watch import RunWatch

    cfg = load_config(BASE, ["monitor.hang_s=60", f"monitor.on_hang={on_hang}", "train.progress=false"])

    def requeue(report):
        return None

    watch = RunWatch(cfg, tmp_path, LocalComm(), total_steps=10, started=0.0, on_hang=requeue)
    watch.start(0, 0, device="cpu", steps_per_epoch=10)
    try:
        assert watch.wd.on_hang is (requeue if on_hang == "requeue" else None)
    finally:
        watch.stop("completed")
    assert json.loads((tmp_path / "heartbeat" / "rank-0.json").read_text())["state"] == "completed"
