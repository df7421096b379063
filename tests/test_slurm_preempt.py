"""End to end on the dev cluster: a pipeline whose 2-rank training is preempted mid-run.

The training stage gets ``scancel --signal=USR2`` mid-run: the ranks checkpoint together, rank 0
requeues the job, the requeued job resumes from the checkpoint and finishes with exactly the
parameters of an uninterrupted 2-rank run (submitted at the same time through the plain
slurm/train.sbatch). The afterok chain survives the requeue: register and infer then run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def make_tiny(root: Path, epochs: int = 6) -> Path:
    """4-class tabular data (1280 train rows) and a softmax config writing under ``root``."""
    from hpc.cli import main

    data = root / "data"
    assert main(["data", "synth", "--kind", "tabular", "--samples", "1600", "--classes", "4",
                 "--features", "8", "--out", str(data), "--samples-per-shard", "400"]) == 0
    cfg = {"name": "tiny", "out_dir": str(root / "runs"), "seed": 3,
           "data": {"dir": str(data), "batch_size": 32},
           "model": {"family": "softmax"}, "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
           "train": {"epochs": epochs, "progress": False, "log_every": 5}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def hpc(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def state(job_id: str) -> str:
    from hpc.launch.slurm import job_state

    return job_state(job_id)


def wait_final(job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = state(job_id)
        if s in FINAL:
            return s
        time.sleep(1)
    raise AssertionError(f"job {job_id} not finished after {timeout}s (state {state(job_id)})")


def wait_step(metrics: Path, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.3)
    raise AssertionError(f"{metrics} never reached step {step} in {timeout}s")


def final_params(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "models" / "last.safetensors"))


def test_preempted_pipeline_resumes_and_matches_uninterrupted_run(slurm_cluster, tmp_path):
    # 40 epochs x 40 steps: a softmax step takes about a millisecond, so with fewer steps the run
    # can finish between our poll seeing step 20 and the signal arriving (then nothing requeues).
    cfg = make_tiny(tmp_path, epochs=40)
    env = {"HPC_HOME": str(tmp_path / "home"), "HPC_REGISTRY": str(tmp_path / "registry")}
    # The uninterrupted reference: plain sbatch with the template, same world size (2).
    ref = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--time=10",
                          f"--output={tmp_path}/ref-%j.out", str(REPO / "slurm" / "train.sbatch")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, **env, "CONFIG": str(cfg), "HPC_PYTHON": sys.executable})
    assert ref.returncode == 0, ref.stderr
    ref_id = ref.stdout.strip().split(";")[0]

    sub = hpc("submit", "pipeline", str(cfg), "registry.name=tiny", "--tasks-per-node", "2", "--time", "10",
              "--infer-input", str(tmp_path / "data" / "test"), "--infer-output", str(tmp_path / "preds"),
              "--infer-tasks", "1", env=env)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    ids = dict(line.split(": job ")[0:2] for line in sub.stdout.splitlines() if ": job " in line)
    train_id, reg_id, infer_id = (ids[k].split()[0] for k in ("train", "register", "infer"))
    run_dir = tmp_path / "runs" / "tiny" / f"slurm-{train_id}"

    wait_step(run_dir / "metrics.jsonl", 20, timeout=150)
    subprocess.run(["scancel", "--signal=USR2", train_id], check=True, timeout=30)

    assert wait_final(infer_id, timeout=300) == "COMPLETED", hpc("logs", infer_id, env=env).stdout
    assert wait_final(ref_id, timeout=120) == "COMPLETED", (tmp_path / f"ref-{ref_id}.out").read_text()[-3000:]
    assert state(train_id) == "COMPLETED" and state(reg_id) == "COMPLETED"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "completed"
    assert summary["slurm"]["restart_count"] == 1, summary["slurm"]          # it was requeued once
    assert summary["world_size"] == 2 and summary["backend"] == "mpi"        # srun --mpi=pmix ranks
    rank0 = (run_dir / "logs" / "rank-0.log").read_text()
    assert "preempted by SIGUSR2" in rank0 and "resumed from" in rank0        # same log, appended
    resumed_step = int(rank0.split("resumed from")[1].split("(step ")[1].split(",")[0])
    assert 20 <= resumed_step < summary["total_steps"]                       # mid-run, from its checkpoint
    assert "requeued (preemptions are not limited)" in (run_dir / "submitit" / f"{train_id}_0_log.err").read_text()

    ref_dir = tmp_path / "runs" / "tiny" / f"slurm-{ref_id}"
    ours, theirs = final_params(run_dir), final_params(ref_dir)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].equal(theirs[k]), f"{k} differs from the uninterrupted run"

    # The chain held: the register stage published the run, the infer stage scored with it.
    from hpc.registry import Registry

    card = Registry(tmp_path / "registry").card("tiny@staging")
    assert card["lineage"]["run_dir"] == str(run_dir.resolve())
    assert card["lineage"]["slurm"]["restart_count"] == 1
    assert (tmp_path / "preds" / "_SUCCESS").is_file()
