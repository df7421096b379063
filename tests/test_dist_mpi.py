"""Every backend under real ``mpiexec -n 2`` and ``-n 4 --oversubscribe``: collectives and GradSync.

One launch per (backend, ranks) runs all the per-rank scenarios (tests/test_dist_comm.py
``collectives``, tests/test_dist_gradsync.py ``gradsync``): starting ranks dominates the cost
(importing torch in 4 processes on 2 busy cores took ~18 s). Run as a script it is the worker.
"""

import contextlib
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
    # close() really freed torch's process group, so gloo's worker threads are joined: one left
    # running can drop a finished work's tensor while the interpreter shuts down and abort the process
    # (the group outlived destroy_process_group() once torch.optim had imported torch.distributed.nn).
    assert not threads_named("pt_gloo_runloop"), "gloo worker threads still running after comm.close()"
    print(f"OK rank {comm.rank}/{comm.size}: collectives gradsync", flush=True)


def threads_named(name: str) -> list[str]:
    """The ids of this process's threads called ``name`` (Linux; elsewhere none are seen)."""
    tasks, found = "/proc/self/task", []
    for tid in os.listdir(tasks) if os.path.isdir(tasks) else []:
        with contextlib.suppress(OSError), open(f"{tasks}/{tid}/comm") as f:
            if f.read().strip() == name:
                found.append(tid)
    return found


if __name__ == "__main__":
    main(sys.argv[1])
