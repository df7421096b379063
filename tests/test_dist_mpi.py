"""Every backend under real ``mpiexec -n 2`` and ``-n 4 --oversubscribe``: collectives and GradSync.

One launch per (backend, ranks) runs all the per-rank scenarios (tests/test_dist_comm.py
``collectives``, tests/test_dist_gradsync.py ``gradsync``): starting ranks dominates the cost
(importing torch in 4 processes on 2 busy cores took ~18 s). Run as a script it is the worker.
"""

import os
import sys

import pytest

HERE = os.path.abspath(__file__)


@pytest.mark.mpi
@pytest.mark.parametrize("backend, n", [
    ("mpi", 2), pytest.param("mpi", 4, marks=pytest.mark.slow),
    ("torch", 2), pytest.param("torch", 4, marks=pytest.mark.slow)])
def test_collectives_and_gradsync(backend, n):
    from conftest import run_mpi

    proc = run_mpi(n, ["python", HERE, backend], timeout=240)
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("OK")) == \
        [f"OK rank {i}/{n}: collectives gradsync" for i in range(n)], proc.stdout


def main(arg: str) -> None:
    """ARG: a backend, or ``auto=EXPECTED`` (init_comm("auto") must pick EXPECTED)."""
    from test_dist_comm import collectives  # tests/ is sys.path[0] when run as a script
    from test_dist_gradsync import gradsync

    from hpc.dist import init_comm

    asked, _, backend = arg.partition("=")
    backend = backend or asked
    comm = init_comm(asked, timeout_s=120)
    collectives(comm, backend)
    gradsync(comm, backend)
    comm.close()
    print(f"OK rank {comm.rank}/{comm.size}: collectives gradsync", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
