"""The trainer under real mpiexec: world-size invariance, exact resume, faults, preemption.

Faults are injected by a user model family (``faulty``, written below into a module that configs
load through ``imports:``): it wraps an MLP and, on one rank at its N-th training forward, raises,
returns NaN or sends itself SIGUSR2. Everything else is the real pipeline: HDF5 shards from
``hpc.data.synth``, ``python -m hpc train`` on 2 ranks, checkpoints on disk.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_mpi

pytestmark = pytest.mark.mpi

FAULTY = '''
import os, signal
from dataclasses import dataclass, field
from torch import nn
from hpc.models import build_model, register_model

@dataclass
class FaultyConfig:
    widths: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.0
    rank: int = 1
    raise_at: int = -1
    nan_at: list[int] = field(default_factory=list)
    signal_at: int = -1

class Faulty(nn.Module):
    def __init__(self, cfg, schema):
        super().__init__()
        self.net = build_model("mlp", {"widths": cfg.widths, "dropout": cfg.dropout}, schema)
        self.cfg, self.calls = cfg, 0
        self.me = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))

    def forward(self, batch):
        out = self.net(batch)
        if not self.training:
            return out
        self.calls += 1
        if self.me == self.cfg.rank:
            if self.calls == self.cfg.raise_at:
                raise RuntimeError("injected failure")
            if self.calls == self.cfg.signal_at:
                os.kill(os.getpid(), signal.SIGUSR2)
            if self.calls in self.cfg.nan_at:
                out = out * float("nan")
        return out

@register_model("faulty", config=FaultyConfig, task="classification")
def build(cfg, schema):
    return Faulty(cfg, schema)
'''


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: synthetic tabular shards, the fault plugin, a base config."""
    from hpc.data import SynthConfig, synth

    root = tmp_path_factory.mktemp("train")
    synth(SynthConfig(kind="tabular", samples=600, features=8, classes=3, seed=3), root / "data",
          split="train=0.8,val=0.1,test=0.1")
    (root / "hpc_test_faults.py").write_text(FAULTY)
    base = {
        "name": "t", "out_dir": str(root / "runs"), "seed": 7, "imports": ["hpc_test_faults"],
        "data": {"dir": str(root / "data"), "batch_size": 32, "augment": {"noise_std": 0.05}},
        "model": {"family": "faulty", "config": {"widths": [32], "dropout": 0.2}},
        "optim": {"name": "adam", "lr": 0.01, "schedule": "step", "step_size": 10, "gamma": 0.5,
                  "warmup_steps": 3},
        "train": {"epochs": 100, "max_steps": 40, "log_every": 5},
        "checkpoint": {"every_steps": 5, "keep": 2},
        "dist": {"timeout_s": 30},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    return root


def train(ws: Path, n: int, *overrides: str, check: bool = True, timeout: float = 180):
    env = {"PYTHONPATH": os.pathsep.join([str(ws), os.environ.get("PYTHONPATH", "")])}
    return run_mpi(n, ["python", "-m", "hpc", "train", str(ws / "base.yaml"), *overrides], env=env,
                   cwd=ws, check=check, timeout=timeout)


def params(run_dir: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "models" / f"{which}.safetensors"))


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k].double() - b[k].double()).abs().max()}"


@pytest.fixture(scope="module")
def straight(ws):
    """40 uninterrupted steps on 2 ranks (2.7 epochs: resume points fall mid-epoch)."""
    train(ws, 2, "run_id=straight")
    return ws / "runs" / "t" / "straight"


def test_straight_run_layout_and_summary(straight):
    s = json.loads((straight / "summary.json").read_text())
    assert s["state"] == "completed" and s["step"] == 40 and s["world_size"] == 2 and s["backend"] == "mpi"
    assert s["model"]["family"] == "faulty" and len(s["data"]["manifest_sha256"]) == 64
    assert set(s["metrics"]) == {"val", "test"} and 0 <= s["metrics"]["test"]["accuracy"] <= 1
    assert s["samples_per_s"] > 0 and s["slurm"]["restart_count"] == 0
    for f in ("config.yaml", "metrics.jsonl", "logs/rank-0.log", "logs/rank-1.log", "models/best.safetensors",
              "checkpoints/latest"):
        assert (straight / f).is_file(), f
    kept = sorted(p.name for p in (straight / "checkpoints").glob("step-*"))
    assert kept == ["step-000000035", "step-000000040"]
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(5, 41, 5))


def test_exact_resume_and_fallback_past_a_corrupt_checkpoint(ws, straight):
    """17 steps, stop; resume to 30; corrupt the newest checkpoint; resume to 40: bit-equal to straight."""
    run = ws / "runs" / "t" / "split"
    train(ws, 2, "run_id=split", "train.max_steps=17")
    r = train(ws, 2, "run_id=split", "train.max_steps=30", "resume=auto")
    assert "resumed from" in r.stderr and "step-000000017" in r.stderr
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-000000030"
    damaged = run / "checkpoints" / latest / "rank-00001.json"   # a rank's file: rank 0 must notice too
    damaged.write_text(damaged.read_text().replace('"batch"', '"bat"'))
    r = train(ws, 2, "run_id=split", "resume=auto")
    assert f"checkpoint {latest} cannot be used" in r.stderr and "rank-00001.json: checksum mismatch" in r.stderr
    assert "resumed from" in r.stderr and "step-000000025" in r.stderr
    assert_bit_equal(params(run), params(straight))


def test_resume_with_another_world_size_is_refused_on_every_rank(ws, straight):
    r = train(ws, 1, "run_id=straight", "resume=auto", check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "written by 2 ranks; this job has 1: exact resume needs the same world size" in r.stderr


def test_preempted_rank_checkpoints_all_and_resume_is_exact(ws, straight):
    run = ws / "runs" / "t" / "pre"
    r = train(ws, 2, "run_id=pre", "model.config.signal_at=12", check=False)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "preempted by SIGUSR2 at step 12" in r.stderr and "not under Slurm" in r.stderr
    assert json.loads((run / "summary.json").read_text())["state"] == "preempted"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000000012"
    train(ws, 2, "run_id=pre", "resume=auto")
    assert_bit_equal(params(run), params(straight))


def test_nonfinite_steps_are_skipped_on_every_rank(ws):
    run = ws / "runs" / "t" / "nan"
    train(ws, 2, "run_id=nan", "model.config.nan_at=[3,4]", "train.max_steps=12")
    s = json.loads((run / "summary.json").read_text())
    assert s["state"] == "completed" and s["step"] == 12
    skipped = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in skipped if r["kind"] == "nonfinite"] == [2, 2]
    assert all(torch.isfinite(t).all() for t in params(run).values())


def test_too_many_nonfinite_steps_stop_without_checkpointing_them(ws):
    run = ws / "runs" / "t" / "nanstop"
    r = train(ws, 2, "run_id=nanstop", "model.config.nan_at=[3,4,5,6,7,8,9]", "train.max_nonfinite=2",
              "checkpoint.every_steps=1", check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "3 non-finite steps in a row at step 2" in r.stderr
    assert json.loads((run / "summary.json").read_text())["state"] == "failed"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000000002"
    ck = load_file(str(run / "checkpoints" / "step-000000002" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in ck.values())


def test_a_rank_that_raises_ends_the_job_naming_it(ws):
    t0 = time.monotonic()
    r = train(ws, 2, "run_id=boom", "model.config.raise_at=4", check=False, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "rank 1/2" in out and "RuntimeError: injected failure" in out and "aborting all ranks" in out
    assert elapsed < 90, f"took {elapsed:.0f}s: the other rank hung instead of aborting"


# -- world-size invariance (in-memory data with identical global batches) ----------------------------

def worker(out_dir: str) -> None:
    """Per rank: train 8 steps with each backend on rank-dependent slices of the same global batches."""
    from hpc.dist.world import world_from_env
    from hpc.train import run
    from hpc.train.memdata import MemoryReader
    from hpc.train.inputs import Data

    w = world_from_env()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    schema = {"fields": {"x": {"dtype": "float32", "shape": [12]}}, "num_classes": 3}
    for variant in ("mpi", "torch", "fused"):
        backend = "mpi" if variant == "fused" else variant
        cfg = {"name": variant, "run_id": f"n{w.size}", "out_dir": out_dir, "seed": 1,
               "data": {"dir": "memory", "batch_size": 16},
               "model": {"family": "mlp", "config": {"widths": [32, 16]}},
               "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3,
                         "fused": variant == "fused", "decay_bias_and_norm": variant == "fused"},
               "train": {"max_steps": 8, "grad_accum": 2, "progress": False},
               "dist": {"backend": backend, "bucket_mb": 0.001, "timeout_s": 60}}
        reader = MemoryReader({"x": x, "y": y}, w.rank, w.size, 16 // w.size, seed=2)
        run(cfg, data=Data(schema, reader))


@pytest.fixture(scope="module")
def invariance(tmp_path_factory):
    out = tmp_path_factory.mktemp("inv")
    for n in (1, 2, 4):
        run_mpi(n, ["python", __file__, "worker", str(out)], timeout=240)
    return out


@pytest.mark.parametrize("backend", ["mpi", "torch", "fused"])
@pytest.mark.parametrize("n", [2, 4])
def test_same_parameters_whatever_the_world_size(invariance, backend, n):
    """float32 sums in another order differ in the last bits; 8 steps keep that below 1e-5.
    ``fused``: the MPI backend with the flat-buffer optimizer of ``hpc.models.ops``."""
    one = params(invariance / backend / "n1")
    many = params(invariance / backend / f"n{n}")
    for k in one:
        torch.testing.assert_close(many[k], one[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    s = json.loads((invariance / backend / f"n{n}" / "summary.json").read_text())
    assert s["world_size"] == n and s["backend"] == ("mpi" if backend == "fused" else backend) and s["step"] == 8


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2])
