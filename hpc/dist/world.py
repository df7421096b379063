"""Who am I in the job: read the launcher's environment once into a frozen ``World``.

This module is the one place that knows the environment variables of every launcher. Order of
precedence (the first that is present wins, so ``srun --mpi=pmix`` inside an sbatch allocation is
read as Open MPI/PMIx, which is what mpi4py will see):

| launcher | rank | world size | local rank | local size | node rank / nodes |
|---|---|---|---|---|---|
| torchrun | RANK | WORLD_SIZE | LOCAL_RANK | LOCAL_WORLD_SIZE | GROUP_RANK / GROUP_WORLD_SIZE |
| Open MPI (mpiexec) | OMPI_COMM_WORLD_RANK | OMPI_COMM_WORLD_SIZE | OMPI_COMM_WORLD_LOCAL_RANK | OMPI_COMM_WORLD_LOCAL_SIZE | rank // local size (*) |
| PMIx (srun --mpi=pmix) | PMIX_RANK | SLURM_STEP_NUM_TASKS | SLURM_LOCALID | the step's tasks on this node | SLURM_NODEID / SLURM_STEP_NUM_NODES |
| PMI / MPICH / Intel MPI | PMI_RANK | PMI_SIZE | MPI_LOCALRANKID | MPI_LOCALNRANKS | as Slurm inside srun, else (*) |
| Slurm (srun) | SLURM_PROCID | SLURM_STEP_NUM_TASKS | SLURM_LOCALID | the step's tasks on this node | SLURM_NODEID / SLURM_STEP_NUM_NODES |
| none | 0 | 1 | 0 | 1 | 0 / 1 |

The step's tasks on this node come from SLURM_STEP_TASKS_PER_NODE (``"2(x3),1"``) at index
SLURM_NODEID (else the job's SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE). (*) mpiexec exports no
node index: ``rank // local size`` is right for its default by-slot mapping with the same number of
ranks on every node (what `mpiexec -n N` and a hostfile of equal slots give); ``--map-by node`` is
not. Under mpiexec the Slurm variables a rank inherits describe mpiexec's own step, not the rank, so
they are not used for it.

``node_name`` is the Slurm node (SLURMD_NODENAME) inside an srun step, else the host name: on the
dev cluster several Slurm nodes share one host. ``master_addr`` is MASTER_ADDR, else ``first_node``:
the first node of the step (rank 0's node under srun's block and cyclic distributions), else of
the job. A Slurm node name need not resolve (the dev cluster's n1/n2 do not); the torch backend
turns it into an address (``hpc.dist.torch_backend.node_address``), with
``slurm_launch_addr`` (SLURM_LAUNCH_NODE_IPADDR: where srun ran) as the last resort.

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
    slurm_nodelist: tuple[str, ...] = ()     # the job's nodes (SLURM_JOB_NODELIST, expanded)
    master_addr: str | None = None
    master_port: int | None = None
    node_rank: int = 0                        # which node of the job step this rank is on (0-based)
    num_nodes: int = 1                        # nodes of the step
    node_name: str = field(default_factory=socket.gethostname)  # Slurm node name, else the host
    first_node: str | None = None             # the step's first node (rank 0's under srun)
    slurm_launch_addr: str | None = None      # SLURM_LAUNCH_NODE_IPADDR: the host srun ran on

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.size, (self.rank, self.size)
        assert 0 <= self.local_rank < max(self.local_size, 1), (self.local_rank, self.local_size)
        assert 0 <= self.node_rank < max(self.num_nodes, 1), (self.node_rank, self.num_nodes)

    def placement(self) -> str:
        """``node n2 (1/2), local rank 0/2``: where this rank runs, for logs."""
        return (f"node {self.node_name} ({self.node_rank}/{self.num_nodes}), "
                f"local rank {self.local_rank}/{self.local_size}")

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


def tasks_per_node(spec: str) -> list[int] | None:
    """Expand Slurm's ``"2(x3),1"`` to ``[2, 2, 2, 1]`` (pure); None when it is not that syntax."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
    """This node's task count: the step's (SLURM_STEP_TASKS_PER_NODE, right for a step smaller than
    the job too), else the job's --ntasks-per-node, else the job's SLURM_TASKS_PER_NODE."""
    node_id = _int(env, "SLURM_NODEID") or 0
    step = env.get("SLURM_STEP_TASKS_PER_NODE")
    counts = tasks_per_node(step) if step else None
    if counts is None:
        n = _int(env, "SLURM_NTASKS_PER_NODE")  # only set when asked for
        if n is not None:
            return n
        spec = env.get("SLURM_TASKS_PER_NODE")
        counts = tasks_per_node(spec) if spec else None
    if counts is None:
        return None
    return counts[node_id] if node_id < len(counts) else None


def _slurm_nodes(env: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(node index, node count) of this task in its srun step; (None, None) outside one."""
    nodes = _int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_JOB_NUM_NODES") or _int(env, "SLURM_NNODES")
    return _int(env, "SLURM_NODEID"), nodes


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
    rank = size = local_rank = local_size = node_rank = num_nodes = None
    launcher = "single"
    in_step = "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun"
        rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank, local_size = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE")
        node_rank, num_nodes = _int(env, "GROUP_RANK"), _int(env, "GROUP_WORLD_SIZE")
    elif "OMPI_COMM_WORLD_RANK" in env:
        launcher = "openmpi"
        rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
        local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
        in_step = False  # mpiexec's ranks inherit the Slurm step of mpiexec (or of its daemons)
    elif "PMIX_RANK" in env:
        launcher = "pmix"
        rank = _int(env, "PMIX_RANK")
        size = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS") or _int(env, "PMIX_SIZE")
        local_rank, local_size = _int(env, "SLURM_LOCALID"), _tasks_per_node(env)
        node_rank, num_nodes = _slurm_nodes(env)
    elif "PMI_RANK" in env:
        launcher = "pmi"
        rank, size = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local_rank, local_size = _int(env, "MPI_LOCALRANKID"), _int(env, "MPI_LOCALNRANKS")
        if in_step:  # srun --mpi=pmi2: Slurm knows the node
            node_rank, num_nodes = _slurm_nodes(env)
    elif in_step:
        # Inside an srun step (the batch script itself also has SLURM_PROCID=0 but is one process).
        launcher = "slurm"
        rank = _int(env, "SLURM_PROCID")
        size = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
        local_rank, local_size = _int(env, "SLURM_LOCALID"), _tasks_per_node(env)
        node_rank, num_nodes = _slurm_nodes(env)
    rank = rank or 0
    size = size or 1
    local_rank = local_rank or 0
    local_size = local_size or (1 if size == 1 else max(local_rank + 1, 1))
    if not 0 <= rank < size:
        raise ValueError(f"launcher {launcher}: rank {rank} is outside world size {size}; "
                         "check the launcher's environment variables")
    if node_rank is None:  # no launcher variable: ranks fill the nodes in order, local_size each
        node_rank = rank // local_size
    if num_nodes is None:
        num_nodes = -(-size // local_size)
    num_nodes = max(num_nodes, node_rank + 1)
    nodelist = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
    step_nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or "") if in_step else ()
    first_node = (step_nodes or nodelist or (None,))[0]
    node_name = (env.get("SLURMD_NODENAME") if in_step else None) or socket.gethostname()
    return World(
        rank=rank, size=size, local_rank=local_rank, local_size=local_size, launcher=launcher,
        slurm_job_id=env.get("SLURM_JOB_ID") or None,
        slurm_array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
        slurm_array_task_id=_int(env, "SLURM_ARRAY_TASK_ID"),
        slurm_ntasks=_int(env, "SLURM_NTASKS"),
        slurm_restart_count=_int(env, "SLURM_RESTART_COUNT") or 0,
        slurm_nodelist=nodelist,
        master_addr=env.get("MASTER_ADDR") or first_node,
        master_port=_int(env, "MASTER_PORT"),
        node_rank=node_rank, num_nodes=num_nodes, node_name=node_name, first_node=first_node,
        slurm_launch_addr=(env.get("SLURM_LAUNCH_NODE_IPADDR") or None) if in_step else None,
    )


def mpi_env_for_root(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables Open MPI needs to run as root (containers, CI): empty for other users."""
    if os.geteuid() != 0:
        return {}
    return {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
