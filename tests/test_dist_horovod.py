"""The horovod backend under real ``mpiexec -n 2``: collectives, training, resume, a failing rank.

Needs Horovod built with PyTorch and MPI (``scripts/build-horovod.sh --install``; scripts/test.sh
runs it). Without it these tests skip, and under ``CI=true`` (or ``HPC_REQUIRE_CLUSTER=1``) they fail:
CI must run them.

- every collective and GradSync scenario of tests/test_dist_mpi.py with ``backend horovod``;
- the shipped ``digits_softmax`` config on scikit-learn's digits, 20 steps with ``dist.backend=mpi``
  and with ``dist.backend=horovod`` in the same launch: the same parameters (rtol 1e-5);
- 10 steps, stop, resume to 20 (new jobs): bit-equal to the uninterrupted horovod run;
- an exception on rank 1 at its 4th step ends the job non-zero, and the output names rank 1;
- a stuck rank: Horovod's stall check (``timeout_s``) ends the job, naming the missing rank;
- without Horovod, ``init_comm("horovod")`` is a ValueError saying how to build it (no MPI needed).
Run as a script it is the worker of the first training launch, or (``stall``) of the stuck-rank job.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REQUIRE_CLUSTER, run_mpi

HERE = Path(__file__).resolve()
STEPS = 20
# A step schedule instead of the config's cosine: the stopped run (fewer max_steps) must see the same
# learning rates as the uninterrupted one.
COMMON = [f"train.max_steps={STEPS}", "train.log_every=5", "train.progress=false", "optim.schedule=step",
          "optim.step_size=7", "optim.warmup_steps=3", "checkpoint.every_steps=3", "checkpoint.keep=2",
          "dist.timeout_s=60"]


@pytest.fixture(scope="module")
def horovod_installed():
    if importlib.util.find_spec("horovod") is None:
        msg = ("Horovod is not installed in this environment: scripts/build-horovod.sh --install "
               "(a ~10 minute source build once, then a cached wheel; scripts/test.sh runs it)")
        if REQUIRE_CLUSTER:
            pytest.fail(msg + "; CI must run the horovod backend tests")
        pytest.skip(msg)


def test_missing_horovod_is_a_clear_error(monkeypatch):
    from hpc.dist import World, init_comm

    monkeypatch.setitem(sys.modules, "horovod.torch", None)  # `import horovod.torch` raises ImportError
    with pytest.raises(ValueError, match=r"scripts/build-horovod.sh --install.*use backend mpi or torch"):
        init_comm("horovod", world=World())


@pytest.mark.mpi
def test_collectives_and_gradsync(horovod_installed):
    """The per-rank scenarios of tests/test_dist_mpi.py (rank-dependent inputs), backend horovod."""
    proc = run_mpi(2, ["python", str(HERE.parent / "test_dist_mpi.py"), "horovod"], timeout=180)
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("OK")) == \
        [f"OK rank {i}/2: collectives gradsync" for i in range(2)], proc.stdout


FAULT_PLUGIN = '''
import os
from dataclasses import dataclass
from hpc.models import build_model, register_model

@dataclass
class NoConfig:
    pass

class RaiseOnRank1(__import__("torch").nn.Module):
    """softmax regression that raises at its 4th training forward on rank 1"""
    def __init__(self, schema):
        super().__init__()
        self.net, self.calls = build_model("softmax", {}, schema), 0
        self.me = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))

    def forward(self, batch):
        if self.training:
            self.calls += 1
            if self.me == 1 and self.calls == 4:
                raise RuntimeError("injected failure on this rank")
        return self.net(batch)

@register_model("raise_on_rank1", config=NoConfig, task="classification")
def build(cfg, schema):
    return RaiseOnRank1(schema)
'''


@pytest.fixture(scope="module")
def ws(tmp_path_factory, horovod_installed):
    """Digits shards, a fault plugin, and one launch training the same config with both backends."""
    from hpc.data.sources import shard_source
    from hpc.data.writer import WriterConfig

    root = tmp_path_factory.mktemp("hvd")
    shard_source("sklearn:digits", root / "digits", split="train=0.8,val=0.1,test=0.1", seed=0,
                 config=WriterConfig(samples_per_shard=200))
    (root / "hpc_test_hvd_faults.py").write_text(FAULT_PLUGIN)
    run_mpi(2, ["python", str(HERE), "worker", str(root)], timeout=240, env=env_for(root))
    return root


def env_for(root: Path) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


def overrides(root: Path, backend: str, run_id: str) -> list[str]:
    return [f"data.dir={root / 'digits'}", f"out_dir={root / 'runs'}", f"run_id={run_id}",
            f"dist.backend={backend}", *COMMON]


def train(root: Path, *args: str, check: bool = True):
    return run_mpi(2, ["python", "-m", "hpc", "train", "digits_softmax", *args], timeout=180,
                   env=env_for(root), cwd=root, check=check)


def params(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "models" / "last.safetensors"))


@pytest.mark.mpi
def test_same_parameters_as_the_mpi_backend(ws):
    runs = ws / "runs" / "digits_softmax"
    mpi, hvd = params(runs / "mpi"), params(runs / "horovod")
    assert mpi.keys() == hvd.keys() and mpi
    for k in mpi:
        torch.testing.assert_close(hvd[k], mpi[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
    for backend in ("mpi", "horovod"):
        s = json.loads((runs / backend / "summary.json").read_text())
        assert s["backend"] == backend and s["world_size"] == 2 and s["step"] == STEPS and s["state"] == "completed"


@pytest.mark.mpi
def test_resume_is_bit_exact(ws):
    run = ws / "runs" / "digits_softmax" / "split"
    train(ws, *overrides(ws, "horovod", "split"), "train.max_steps=10")
    r = train(ws, *overrides(ws, "horovod", "split"), "resume=auto")
    assert "resumed from" in r.stderr and "step-000000010" in r.stderr, r.stderr[-3000:]
    straight = params(ws / "runs" / "digits_softmax" / "horovod")
    resumed = params(run)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), f"{k}: max |diff| {(straight[k] - resumed[k]).abs().max()}"


@pytest.mark.mpi
def test_an_exception_on_one_rank_ends_the_job_naming_it(ws):
    r = train(ws, *overrides(ws, "horovod", "boom"), "imports=[hpc_test_hvd_faults]",
              "model.family=raise_on_rank1", check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "rank 1/2" in out and "RuntimeError: injected failure on this rank" in out, out[-3000:]
    assert "aborting all ranks" in out, out[-3000:]


@pytest.mark.mpi
def test_a_stuck_rank_ends_the_job_naming_it(horovod_installed):
    """Rank 1 never reaches the all-reduce: with timeout_s=4 Horovod's stall check shuts down, rank 0's
    wait raises, and the exception hook aborts the job (instead of waiting for the walltime)."""
    r = run_mpi(2, ["python", str(HERE), "stall"], timeout=120, check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "Missing ranks:\n1" in out and "hpc.allreduce.sum.float32.3.0" in out, out[-3000:]
    assert "hpc: rank 0/2" in out and "aborting the job (horovod backend)" in out, out[-3000:]
    assert "rank 1 passed the all-reduce" not in out


def stall() -> None:
    import time

    from hpc.dist import init_comm

    comm = init_comm("horovod", timeout_s=4)
    if comm.rank == 1:
        time.sleep(300)  # stuck (the job is aborted long before)
    comm.allreduce_(torch.ones(3))
    print(f"rank {comm.rank} passed the all-reduce", flush=True)
    comm.close()


def worker(root: str) -> None:
    """One launch, two runs of the same config: backend mpi, then backend horovod."""
    from hpc.train import run

    for backend in ("mpi", "horovod"):
        run("digits_softmax", overrides(Path(root), backend, backend))


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2])
    elif sys.argv[1] == "stall":
        stall()
