"""hpc.dist under the real Slurm (dev cluster): srun --mpi=pmix -> mpi backend, plain srun -> torch
backend with the rendezvous derived from the node list and the job id. Same per-rank scenarios as
tests/test_dist_mpi.py (collectives and GradSync with rank-dependent inputs)."""

import os
import subprocess
import sys

import pytest

from conftest import mpi_env

pytestmark = pytest.mark.slurm
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_dist_mpi.py")


@pytest.mark.parametrize("srun_args, arg", [
    (["--mpi=pmix"], "auto=mpi"),  # PMIx: MPI initializes from Slurm, auto picks mpi
    ([], "auto=torch"),            # plain srun: no MPI; auto picks torch, rendezvous from Slurm vars
])
def test_srun_two_tasks(slurm_cluster, srun_args, arg):
    env = mpi_env()
    for var in ("MASTER_ADDR", "MASTER_PORT"):  # rule 2 (first host + job-id port) must do it
        env.pop(var, None)
    proc = subprocess.run(["srun", *srun_args, "-n", "2", "-t", "3", sys.executable, WORKER, arg],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("OK")) == \
        [f"OK rank {i}/2: collectives gradsync" for i in range(2)], proc.stdout + proc.stderr
