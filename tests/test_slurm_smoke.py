"""Smoke tests of the real one-node Slurm (slurm/dev-cluster.sh): submitit and srun --mpi=pmix."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import cloudpickle
import pytest

from conftest import mpi_env

pytestmark = pytest.mark.slurm

# The job's Python cannot import this test module by name: ship the functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _rank_result(base: int) -> dict:
    import submitit

    from hpc.dist.world import world_from_env

    env = submitit.JobEnvironment()
    world = world_from_env()
    return {"submitit_rank": env.global_rank, "num_tasks": env.num_tasks, "world_rank": world.rank,
            "world_size": world.size, "job_id": world.slurm_job_id, "value": base * (world.rank + 1)}


def test_submitit_two_tasks_return_both_ranks(slurm_cluster, tmp_path):
    import submitit

    from hpc.launch.slurm import install_submitit_watcher, wait_for

    install_submitit_watcher()
    ex = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="slurm")
    ex.update_parameters(nodes=1, tasks_per_node=2, timeout_min=5, name="smoke")
    job = ex.submit(_rank_result, 7)
    results = job.results()
    assert [r["submitit_rank"] for r in results] == [0, 1]
    assert [r["world_rank"] for r in results] == [0, 1]  # hpc.dist sees the same ranks as submitit
    assert {r["world_size"] for r in results} == {2} and {r["num_tasks"] for r in results} == {2}
    assert [r["value"] for r in results] == [7, 14]
    assert {r["job_id"] for r in results} == {job.job_id}
    # Without accounting, the state comes from squeue (hpc.launch.slurm), not a failing sacct.
    assert wait_for(job.job_id, {"COMPLETED"}, timeout=60) == "COMPLETED"


_ALLREDUCE = """
import numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
x = np.array([float(c.rank + 1), float(10 * (c.rank + 1))])
y = np.zeros_like(x)
c.Allreduce(x, y)
print(f"rank={c.rank} size={c.size} sum={y[0]:.0f},{y[1]:.0f}", flush=True)
"""


def test_srun_pmix_mpi4py_allreduce(slurm_cluster):
    proc = subprocess.run(["srun", "--mpi=pmix", "-n", "2", "-t", "2", sys.executable, "-c", _ALLREDUCE],
                          capture_output=True, text=True, timeout=120, env=mpi_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank="))
    # Each rank contributes (r+1, 10(r+1)): both must see the sum over both ranks.
    assert lines == ["rank=0 size=2 sum=3,30", "rank=1 size=2 sum=3,30"], proc.stdout + proc.stderr


def test_dev_cluster_status_and_idempotent_up(slurm_cluster):
    repo = os.path.join(os.path.dirname(__file__), "..")
    script = os.path.join(repo, "slurm", "dev-cluster.sh")
    state = os.environ.get("HPC_SLURM_DEV_DIR") or os.path.join(repo, ".slurm-dev")
    if not glob.glob(os.path.join(state, "run", "slurmd-*.pid")):  # SlurmdPidFile=run/slurmd-%n.pid
        pytest.skip("an existing cluster is in use, not the dev cluster")
    up = subprocess.run(["bash", script, "up"], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    assert "started" not in up.stderr  # already running: nothing restarted
    st = subprocess.run(["bash", script, "status"], capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stdout + st.stderr
    for daemon in ("munged", "slurmctld", "slurmd"):
        assert f"{daemon}: running (pid " in st.stdout
