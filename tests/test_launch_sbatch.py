"""The sbatch script `hpc submit --dry-run` prints: pure rendering, golden files, validation.

Regenerate the golden files after an intended change with HPC_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpc.launch.sbatch import SlurmResources, extra_params, parse_time, render_sbatch, slurm_parameters

GOLDEN = Path(__file__).parent / "golden"
PY = "/opt/venv/bin/python"


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HPC_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run with HPC_UPDATE_GOLDEN=1 once"
    assert text == path.read_text(), f"rendering changed; diff against {path} (HPC_UPDATE_GOLDEN=1 to accept)"


def test_golden_train_two_nodes_mpi():
    res = SlurmResources(nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=8, mem="64G",
                         time="2:00:00", partition="gpu", account="proj1", qos="high", constraint="a100",
                         sbatch_args=["--reservation=r1", "--exclusive"], name="digits",
                         signal_delay_s=300, max_requeues=5)
    _golden("train_2n4t_mpi.sbatch", render_sbatch(res, "/runs/digits/slurm-%j/submitit", PY))


def test_golden_torch_backend_array_with_dependency():
    # No --mpi=pmix for torch rendezvous; an array of 6 with at most 2 at once; afterok dependency
    # with kill-on-invalid-dep so a failed stage cancels this one.
    res = SlurmResources(tasks_per_node=2, time="30", name="sweep", mpi=False, array_parallelism=2,
                         dependency="afterok:41")
    _golden("sweep_array_torch.sbatch", render_sbatch(res, "/runs/s/slurm-%j/submitit", PY, array_size=6))


def test_unlimited_time_renders_and_skips_the_signal_check():
    res = SlurmResources(time="UNLIMITED", signal_delay_s=600)
    assert res.check().minutes is None
    assert "#SBATCH --time=UNLIMITED" in render_sbatch(res, "/f/%j", PY)


def test_one_time_parser_for_sbatch_and_squeue():
    """sbatch's --time and squeue's %L go through hpc.launch.slurmtime (no second parser)."""
    from hpc.launch import requeue
    from hpc.launch.slurmtime import parse_slurm_time

    for spec in ("30", "4:59", "2:00:00", "1-0", "1-2:30", "1-02:03:04", "UNLIMITED"):
        seconds = parse_slurm_time(spec)
        assert requeue.parse_duration(spec) == seconds
        assert parse_time(spec) == (None if seconds is None else -(-seconds // 60))
    assert parse_slurm_time("1-02") == 93600 and parse_slurm_time("5") == 300


def test_rendering_is_what_matters():
    text = render_sbatch(SlurmResources(tasks_per_node=2, time="0:10:00", signal_delay_s=45), "/f/%j", PY)
    assert "#SBATCH --ntasks-per-node=2" in text and "#SBATCH --time=10" in text
    assert "#SBATCH --signal=USR2@45" in text and "export HPC_SIGNAL_DELAY_S=45" in text
    assert "srun --unbuffered" in text and "--mpi=pmix" in text
    assert "#SBATCH --open-mode=append" in text  # a requeued job keeps appending to its logs


@pytest.mark.parametrize("spec,minutes", [("30", 30), ("2:30", 3), ("2:00:00", 120), ("1-0", 1440),
                                          ("1-2:30", 1590), ("0-0:0:59", 1), ("1-00:00:01", 1441),
                                          ("UNLIMITED", None), ("infinite", None)])
def test_parse_time(spec, minutes):
    assert parse_time(spec) == minutes


@pytest.mark.parametrize("spec", ["", "abc", "1:2:3:4", "-5", "0", "0:00:00", "1h"])
def test_parse_time_rejects(spec):
    with pytest.raises(ValueError, match="--time"):
        parse_time(spec)


@pytest.mark.parametrize("kwargs,flag", [
    (dict(nodes=0), "--nodes"), (dict(tasks_per_node=-1), "--tasks-per-node"),
    (dict(gpus_per_node=-2), "--gpus-per-node"), (dict(mem="lots"), "--mem"),
    (dict(name="a b"), "--name"), (dict(time="5", signal_delay_s=300), "--signal-delay-s"),
    (dict(max_requeues=-1), "--max-requeues"), (dict(array_parallelism=0), "--max-parallel"),
    (dict(sbatch_args=["--time=5"]), "set by hpc submit"), (dict(sbatch_args=["exclusive"]), "--sbatch-arg"),
])
def test_impossible_requests_are_refused_with_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        SlurmResources(**kwargs).check()


def test_extra_params_and_parameters():
    assert extra_params(["--reservation=r1", "--exclusive", "--comment=a=b"]) == {
        "reservation": "r1", "exclusive": True, "comment": "a=b"}
    p = slurm_parameters(SlurmResources(tasks_per_node=3, cpus_per_task=2, mpi=False))
    assert p["ntasks_per_node"] == 3 and "srun_args" not in p
    assert "export OMP_NUM_THREADS=2" in p["setup"]
