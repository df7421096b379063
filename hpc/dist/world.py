"""Who am I in the job: read the launcher's environment once into a frozen ``World``.

This module is the one place that knows the environment variables of every launcher. Order of
precedence (the first that is present wins, so ``srun --mpi=pmix`` inside an sbatch allocation is
read as Open MPI/PMIx, which is what mpi4py will see):

| launcher | rank | world size | local rank | local size |
|---|---|---|---|---|
| torchrun | RANK | WORLD_SIZE | LOCAL_RANK | LOCAL_WORLD_SIZE |
| Open MPI (mpiexec) | OMPI_COMM_WORLD_RANK | OMPI_COMM_WORLD_SIZE | OMPI_COMM_WORLD_LOCAL_RANK | OMPI_COMM_WORLD_LOCAL_SIZE |
| PMIx (srun --mpi=pmix) | PMIX_RANK | SLURM_NTASKS | SLURM_LOCALID | SLURM_NTASKS_PER_NODE |
| PMI / MPICH / Intel MPI | PMI_RANK | PMI_SIZE | MPI_LOCALRANKID | MPI_LOCALNRANKS |
| Slurm (srun) | SLURM_PROCID | SLURM_NTASKS | SLURM_LOCALID | SLURM_NTASKS_PER_NODE |
| none | 0 | 1 | 0 | 1 |

Slurm facts (job id, array job id and index, task count, restart count, node list) are read whenever
present. No other module reads ``SLURM_*`` variables (tests/test_world.py checks it): they take a
``World``.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launcher: str = "single"  # torchrun | openmpi | pmix | pmi | slurm | single
    hostname: str = field(default_factory=socket.gethostname)
    slurm_job_id: str | None = None
    slurm_array_job_id: str | None = None     # the array's own id (submitit's %j is <array>_<index>)
    slurm_array_task_id: int | None = None
    slurm_ntasks: int | None = None           # tasks of the allocation (SLURM_NTASKS), also in the batch script
    slurm_restart_count: int = 0
    slurm_nodelist: tuple[str, ...] = ()
    master_addr: str | None = None
    master_port: int | None = None

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.size, (self.rank, self.size)
        assert 0 <= self.local_rank < max(self.local_size, 1), (self.local_rank, self.local_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def under_slurm(self) -> bool:
        return self.slurm_job_id is not None

    @property
    def under_mpi(self) -> bool:
        """Started by an MPI launcher (mpiexec or srun --mpi=pmix/pmi2): mpi4py can initialize."""
        return self.launcher in ("openmpi", "pmix", "pmi")


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
    # SLURM_TASKS_PER_NODE looks like "2(x3),1"; SLURM_NTASKS_PER_NODE is only set when asked for.
    n = _int(env, "SLURM_NTASKS_PER_NODE")
    if n is not None:
        return n
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    node_id = _int(env, "SLURM_NODEID") or 0
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else None


def expand_nodelist(spec: str) -> tuple[str, ...]:
    """Expand a Slurm host list such as ``"node[01-03,07],gpu5"`` (a pure function)."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", spec):
        prefix, ranges = m.group(1), m.group(2)
        if not prefix.strip():
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                hosts += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(prefix + r)
    return tuple(hosts)


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """Read the launcher's variables (pure given ``env``; defaults to ``os.environ``)."""
    env = os.environ if env is None else env
    rank = size = local_rank = local_size = None
    launcher = "single"
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun"
        rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank, local_size = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE")
    elif "OMPI_COMM_WORLD_RANK" in env:
        launcher = "openmpi"
        rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
        local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    elif "PMIX_RANK" in env:
        launcher = "pmix"
        rank = _int(env, "PMIX_RANK")
        size = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS") or _int(env, "PMIX_SIZE")
        local_rank, local_size = _int(env, "SLURM_LOCALID"), _tasks_per_node(env)
    elif "PMI_RANK" in env:
        launcher = "pmi"
        rank, size = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local_rank, local_size = _int(env, "MPI_LOCALRANKID"), _int(env, "MPI_LOCALNRANKS")
    elif "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        # Inside an srun step (the batch script itself also has SLURM_PROCID=0 but is one process).
        launcher = "slurm"
        rank = _int(env, "SLURM_PROCID")
        size = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
        local_rank, local_size = _int(env, "SLURM_LOCALID"), _tasks_per_node(env)
    rank = rank or 0
    size = size or 1
    local_rank = local_rank or 0
    local_size = local_size or (1 if size == 1 else max(local_rank + 1, 1))
    if not 0 <= rank < size:
        raise ValueError(f"launcher {launcher}: rank {rank} is outside world size {size}; "
                         "check the launcher's environment variables")
    nodelist = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
    master_addr = env.get("MASTER_ADDR") or (nodelist[0] if nodelist else None)
    return World(
        rank=rank, size=size, local_rank=local_rank, local_size=local_size, launcher=launcher,
        slurm_job_id=env.get("SLURM_JOB_ID") or None,
        slurm_array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
        slurm_array_task_id=_int(env, "SLURM_ARRAY_TASK_ID"),
        slurm_ntasks=_int(env, "SLURM_NTASKS"),
        slurm_restart_count=_int(env, "SLURM_RESTART_COUNT") or 0,
        slurm_nodelist=nodelist,
        master_addr=master_addr,
        master_port=_int(env, "MASTER_PORT"),
    )


def mpi_env_for_root(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables Open MPI needs to run as root (containers, CI): empty for other users."""
    if os.geteuid() != 0:
        return {}
    return {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
