"""`hpc submit --local` (submitit LocalExecutor -> mpiexec ranks) and `--debug` (in this process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc.cli import main
from test_slurm_preempt import make_tiny


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("launch_local"), epochs=1)


def _run_dir(out: str) -> Path:
    return Path(out.split("run dir: ")[1].split()[0])


@pytest.mark.mpi
def test_local_mode_runs_two_ranks_with_mpiexec(cfg, capsys):
    assert main(["submit", "train", str(cfg), "--local", "--tasks-per-node", "2", "--wait"]) == 0
    out = capsys.readouterr().out
    run_dir = _run_dir(out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "completed" and summary["world_size"] == 2 and summary["backend"] == "mpi"
    assert (run_dir / "submitit").is_dir() and run_dir.name.startswith("train-")
    assert "finished: " in out


def test_debug_mode_runs_in_this_process(cfg, capsys):
    assert main(["submit", "train", str(cfg), "--debug", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((_run_dir(out) / "summary.json").read_text())
    assert summary["state"] == "completed" and summary["world_size"] == 1
    assert "train: job " in out and '"state": "completed"' in out
