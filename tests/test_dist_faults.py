"""Faults: a rank that raises, is killed or is stuck must not leave the others hanging.

Run as a script (``python tests/test_dist_faults.py SCENARIO``) it is the per-rank worker: rank 1
misbehaves after printing the time it does so, the other ranks wait in a collective that would
otherwise never return. The tests measure from that moment to the job's exit.
"""

import os
import re
import signal
import sys
import time

import pytest

HERE = os.path.abspath(__file__)
QUICK_S = 20  # generous: the box is shared; an MPI_Abort takes well under a second unloaded


def worker(scenario: str) -> None:
    from hpc.dist import init_comm

    backend, what = scenario.split("-")
    comm = init_comm(backend, timeout_s=3 if what == "stuck" else 120)
    comm.barrier()
    if comm.rank == 1:
        print(f"MISBEHAVING_AT {time.time():.3f}", flush=True)
        if what == "raise":
            raise ValueError("boom on purpose")
        if what == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if what == "exit":  # e.g. a CLI returning 2 on one rank only
            sys.exit(2)
        time.sleep(120)  # stuck
    else:
        import torch

        comm.allreduce_(torch.ones(4))  # waits for rank 1 forever, unless something ends it
    print(f"NOT REACHED rank {comm.rank}", flush=True)


def run(n: int, scenario: str):
    from conftest import run_mpi

    proc = run_mpi(n, ["python", HERE, scenario], timeout=180, check=False)
    end = time.time()
    out = proc.stdout + proc.stderr
    m = re.search(r"MISBEHAVING_AT (\d+\.\d+)", out)
    assert m, out[-3000:]
    assert proc.returncode != 0 and "NOT REACHED" not in out, out[-3000:]
    return end - float(m.group(1)), out


@pytest.mark.mpi
def test_unhandled_exception_aborts_all_ranks():
    took, out = run(3, "mpi-raise")
    assert took < QUICK_S, (took, out[-3000:])
    assert "ValueError: boom on purpose" in out
    assert re.search(r"hpc: rank 1/3 \(.*\) failed with an unhandled ValueError.*aborting the job", out)
    assert "MPI_ABORT was invoked on rank 1" in out, out[-3000:]


@pytest.mark.mpi
def test_killed_rank_ends_the_job():
    took, out = run(2, "mpi-kill")
    assert took < QUICK_S, (took, out[-3000:])
    assert re.search(r"rank 1 .*(signal 9|Killed)", out, re.S), out[-3000:]


@pytest.mark.mpi
def test_early_exit_without_close_aborts_the_job():
    took, out = run(2, "mpi-exit")  # the comm's timeout is 120 s: this must not wait for it
    assert took < QUICK_S, (took, out[-3000:])
    assert re.search(r"hpc: rank 1/2 .*exiting without comm.close", out), out[-3000:]


@pytest.mark.mpi
def test_stuck_rank_hits_the_mpi_collective_timeout():
    took, out = run(2, "mpi-stuck")
    assert took < 3 + QUICK_S, (took, out[-3000:])
    assert re.search(r"hpc: rank 0/2 .*allreduce did not complete within timeout_s=3", out), out[-3000:]


@pytest.mark.mpi
def test_stuck_rank_hits_the_torch_backend_timeout():
    took, out = run(2, "torch-stuck")
    assert took < 3 + QUICK_S, (took, out[-3000:])
    assert re.search(r"hpc: rank 0/2 .*torch.distributed .*allreduce.*timeout_s=3", out), out[-3000:]
    assert "MPI_ABORT was invoked on rank 0" in out  # the torch backend under mpiexec aborts the job


if __name__ == "__main__":
    worker(sys.argv[1])
