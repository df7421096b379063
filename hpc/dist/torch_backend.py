"""torch.distributed backend: gloo on CPU, NCCL on GPU (one GPU per rank, chosen by local rank).

Rendezvous (where rank 0 listens), first match wins:
1. ``MASTER_ADDR`` + ``MASTER_PORT`` (torchrun, or set by the user);
2. under Slurm: the first node of the step (rank 0's node; ``World.first_node``), port
   ``PORT_BASE + job id % PORT_SPAN`` (so two jobs sharing a first node do not collide, and every
   task computes the same port). A Slurm node *name* need not resolve (the dev cluster's n1/n2 do
   not, some sites only set NodeAddr): ``node_address`` then uses the address Slurm itself reaches
   the node at (``scontrol show node``: NodeAddr), and last the address srun ran on;
3. under an MPI launcher: rank 0 picks a free port and broadcasts its address over MPI
   (127.0.0.1 when all ranks are on one host);
otherwise a ValueError says what to set.

Every collective is bounded by ``timeout_s`` (the process group's timeout): a dead or stuck peer
makes the call raise a RuntimeError naming this rank and the operation instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
import shutil
import socket
import subprocess
import sys
import types
import warnings
from typing import Any, Mapping

import torch
import torch.distributed as dist

from hpc.dist.comm import DEFAULT_TIMEOUT_S, Comm, Handle, check_op
from hpc.dist.world import World

PORT_BASE, PORT_SPAN = 15000, 20000  # ports 15000-34999: below the usual ephemeral range (32768+ on
# Linux overlaps a little; the job-id spread makes a clash with a live ephemeral port unlikely)
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def slurm_port(job_id: str) -> int:
    """The port every task of Slurm job ``job_id`` derives for the rendezvous (pure)."""
    digits = "".join(ch for ch in job_id if ch.isdigit())
    if not digits:
        raise ValueError(f"SLURM_JOB_ID={job_id!r} has no digits to derive a port from; set MASTER_PORT")
    return PORT_BASE + int(digits) % PORT_SPAN


def static_rendezvous(world: World, env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """(address, port) from the environment alone (rules 1-2 above), or None (pure given ``env``)."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR") or world.master_addr
    port = world.master_port
    if port is None and env.get("MASTER_PORT"):
        port = int(env["MASTER_PORT"])
    if world.under_slurm and (world.first_node or world.slurm_nodelist):
        addr = addr or world.first_node or world.slurm_nodelist[0]
        port = port or slurm_port(world.slurm_job_id)
    return (addr, port) if addr and port else None


def _resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        return True
    except (OSError, UnicodeError):
        return False


def scontrol_node_addr(node: str, timeout_s: float = 30) -> str | None:
    """The NodeAddr Slurm has for ``node`` (``scontrol show node -o``), or None."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "show", "node", "-o", node], capture_output=True, text=True,
                             timeout=timeout_s).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(?:^|\s)NodeAddr=(\S+)", out)
    return m.group(1) if m else None


def node_address(node: str, launch_addr: str | None = None, *, resolves=_resolves,
                 slurm_addr=scontrol_node_addr) -> str:
    """An address other nodes can reach Slurm node ``node`` at (rule 2 of the module doc).

    The name itself when it resolves (DNS, /etc/hosts: the usual site); else the NodeAddr Slurm uses
    for it (one ``scontrol`` call; the dev cluster's nodes are all 127.0.0.1); else ``launch_addr``
    (SLURM_LAUNCH_NODE_IPADDR: right when srun ran on that node, as in a batch script, where
    `hpc submit` runs it); else the name, and the rendezvous error says to set MASTER_ADDR.
    """
    if resolves(node):
        return node
    addr = slurm_addr(node)
    if addr and addr != node and resolves(addr):
        return addr
    return launch_addr or node


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def mpi_rendezvous(world: World) -> tuple[str, int]:
    """Rank 0's address and a free port, broadcast over MPI (rule 3)."""
    from hpc.dist.mpi_backend import load_mpi

    comm = load_mpi().COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    if world.rank == 0:
        addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.getfqdn()
        found = (addr, _free_port())
    else:
        found = None
    return comm.bcast(found, root=0)


class _WorkHandle(Handle):
    def __init__(self, comm: "TorchComm", work, tensor: torch.Tensor, staged: torch.Tensor,
                 what: str = "iallreduce wait"):
        self._comm, self._work, self._tensor, self._staged = comm, work, tensor, staged
        self._what, self._done = what, False

    def test(self) -> bool:
        return self._done or self._work.is_completed()

    def wait(self) -> torch.Tensor:
        if not self._done:
            with self._comm._errors(self._what):
                self._work.wait()
            if self._staged is not self._tensor:
                self._tensor.copy_(self._staged)
            self._done = True
        return self._tensor


class TorchComm(Comm):
    backend = "torch"
    overlap = True  # async work runs on the process group's own threads/streams

    def __init__(self, world: World, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 env: Mapping[str, str] | None = None):
        use_cuda = torch.cuda.is_available()
        device = f"cuda:{world.local_rank % torch.cuda.device_count()}" if use_cuda else "cpu"
        super().__init__(world, timeout_s, device)
        self.pg_backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(self.device)
        if world.under_mpi and world.size > 1:
            # Started by mpiexec: initialize MPI too (about a second) so abort() is MPI_Abort and takes
            # every rank down; a plain non-zero exit leaves Open MPI waiting for the other ranks.
            from hpc.dist.mpi_backend import load_mpi

            self._MPI = load_mpi()
        self._owns_pg = not dist.is_initialized()
        if self._owns_pg:
            found = static_rendezvous(world, env)
            if found and world.under_slurm and found[0] == world.first_node \
                    and not (os.environ if env is None else env).get("MASTER_ADDR"):
                found = (node_address(found[0], world.slurm_launch_addr), found[1])
            if found is None and world.size > 1:
                if not world.under_mpi:
                    raise ValueError(
                        f"backend torch with {world.size} ranks ({world.launcher}): no rendezvous; set "
                        "MASTER_ADDR and MASTER_PORT, or launch with torchrun, srun or mpiexec")
                found = mpi_rendezvous(world)
            addr, port = found or ("127.0.0.1", _free_port())
            self.init_method = f"tcp://{addr}:{port}"
            timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else 1e7)
            with self._errors(f"rendezvous at {self.init_method}"):
                dist.init_process_group(self.pg_backend, init_method=self.init_method, rank=world.rank,
                                        world_size=world.size, timeout=timeout)
        elif dist.get_world_size() != world.size or dist.get_rank() != world.rank:
            raise ValueError(f"torch.distributed is already initialized as rank {dist.get_rank()} of "
                             f"{dist.get_world_size()}, but the launcher says {world.rank} of {world.size}")
        self._install_excepthook()

    @contextlib.contextmanager
    def _errors(self, what: str):
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            raise RuntimeError(f"hpc: rank {self.rank}/{self.size} ({self.world.node_name}): torch.distributed "
                               f"{what} failed or did not complete within timeout_s={self.timeout_s}: another "
                               f"rank is dead or stuck (see its log). Cause: {e}") from e

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        # gloo/NCCL need contiguous tensors on the group's device: stage others through one copy.
        if t.device == self.device and t.is_contiguous():
            return t
        return t.detach().to(self.device).contiguous()

    def allreduce_(self, tensor, op="sum"):
        return self.iallreduce_(tensor, op, what="allreduce").wait()

    def iallreduce_(self, tensor, op="sum", what="iallreduce wait"):
        staged = self._staged(tensor)
        with self._errors(what):
            work = dist.all_reduce(staged, op=_OPS[check_op(op)], async_op=True)
        return _WorkHandle(self, work, tensor, staged, what)

    def broadcast_(self, tensor, root=0):
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of this world (0..{self.size - 1})")
        staged = self._staged(tensor)
        with self._errors("broadcast"):
            dist.broadcast(staged, src=root)
        if staged is not tensor:
            tensor.copy_(staged)
        return tensor

    def barrier(self):
        with self._errors("barrier"):
            if self.pg_backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def allgather_object(self, obj: Any) -> list:
        out: list = [None] * self.size
        with self._errors("allgather_object"):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        with self._errors("broadcast_object"):
            dist.broadcast_object_list(box, src=root)
        return box[0]

    def abort(self, code: int = 1):
        self._flush()
        if "mpi4py.MPI" in sys.modules:  # launched by mpiexec: take the other ranks down too
            sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)
        os._exit(code)  # torchrun / srun --kill-on-bad-exit end the other ranks

    def close(self):
        super().close()
        if self._owns_pg and dist.is_initialized():
            # destroy_process_group() only unregisters the group: its backend (and gloo's worker threads)
            # lives while any reference does. A worker drops its last reference to each finished work,
            # and with it the work's tensors, shortly after waking the caller; a tensor whose Python
            # object is already gone then needs the GIL, and once the interpreter is finalizing that
            # kills the process (std::terminate, exit 134). So the group must really be freed here:
            # its destructor (run without the GIL) drains the queue and joins the workers.
            pg, alone = dist.group.WORLD, object()
            dist.destroy_process_group()
            if sys.getrefcount(pg) > sys.getrefcount(alone):  # held elsewhere too
                _forget_in_defaults(pg)
            stray = sys.getrefcount(pg) - sys.getrefcount(alone)
            del pg  # the last reference, normally: the backend's threads are joined now
            if stray > 0:
                warnings.warn(f"hpc: rank {self.rank}: torch.distributed's process group is still referenced "
                              f"{stray} time(s) after close(); its {self.pg_backend} threads outlive it and may "
                              "abort the interpreter at exit", RuntimeWarning, stacklevel=2)


def _forget_in_defaults(pg) -> None:
    """Replace ``pg`` by None (the default group) in every function's default arguments.

    ``def f(..., group=dist.group.WORLD)`` evaluates its default at definition time, so a module imported
    after init_process_group keeps the group alive for good: torch.distributed.nn.functional does (ten
    functions), and the first ``torch.optim`` optimizer imports it through torch._dynamo.
    """
    for obj in gc.get_objects():
        if type(obj) is not types.FunctionType:  # (isinstance would query proxies' __class__)
            continue
        if obj.__defaults__ and any(v is pg for v in obj.__defaults__):
            obj.__defaults__ = tuple(None if v is pg else v for v in obj.__defaults__)
        if obj.__kwdefaults__ and any(v is pg for v in obj.__kwdefaults__.values()):
            obj.__kwdefaults__ = {k: None if v is pg else v for k, v in obj.__kwdefaults__.items()}
