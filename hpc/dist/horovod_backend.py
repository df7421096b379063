"""Horovod backend through horovod.torch (optional: nothing else in the suite needs Horovod).

Launch as for MPI (``mpiexec -n N`` / ``srun --mpi=pmix``, or ``horovodrun``). Build and install
Horovod with ``scripts/build-horovod.sh --install`` (a patched source build against this
environment's torch and MPI; docs/dist.md "Horovod").

MPI is initialized through mpi4py first (with the MCA defaults of ``mpi_backend``, thread level
MULTIPLE); ``hvd.init()`` then runs on that MPI, and Horovod leaves finalizing it to mpi4py. That gives
this backend what the mpi backend has: ``abort()`` is ``MPI_Abort`` on ``COMM_WORLD`` (mpiexec ends
every rank at once) and the exit-without-``close()`` check (``Comm._install_excepthook``).

Horovod's background thread runs the collectives, so ``iallreduce_`` overlaps with computation.
Tensors are matched across ranks by name, and Horovod's response cache (which skips the coordination
round for a name it has seen) works only if names repeat: a collective's name is its kind, op, dtype
and size plus a per-signature counter modulo ``_NAME_CYCLE``. Collectives are issued in the same order
on every rank (as MPI requires too), so every rank derives the same names, and the same names come
back every training step (GradSync's buckets, the trainer's flags). A name still in flight on this
rank is waited for before it is reused.

Horovod's tensor fusion is off unless ``HOROVOD_FUSION_THRESHOLD`` is set: GradSync fuses already.
A stuck peer: ``timeout_s`` becomes ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` (Horovod shuts down, the
pending collective raises, the exception hook aborts the job). tests/test_dist_horovod.py runs it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from hpc.dist.comm import DEFAULT_TIMEOUT_S, Comm, Handle, check_op
from hpc.dist.mpi_backend import load_mpi
from hpc.dist.world import World

INSTALL_HINT = (
    "backend 'horovod' needs horovod.torch, which is not importable ({err}). Build and install it into "
    "this environment with scripts/build-horovod.sh --install (Horovod 0.28.1 from source with "
    "HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 and the CMake/C++17 fixes current torch needs, 3-10 min "
    "once, then cached; docs/dist.md \"Horovod\"), or use backend mpi or torch")

_NAME_CYCLE = 8
# bfloat16 is reduced as float32 and rounded once at the end, as on the mpi backend (which has to:
# numpy has no bfloat16), so both backends give the same sums.
_CARRY = {torch.bfloat16: torch.float32}


def load_horovod():
    try:
        import horovod.torch as hvd
    except ImportError as e:  # also raised when Horovod was built without PyTorch support
        raise ValueError(INSTALL_HINT.format(err=e)) from None
    return hvd


class _HvdHandle(Handle):
    def __init__(self, hvd, handle, tensor: torch.Tensor, staged: torch.Tensor):
        self._hvd, self._handle, self._tensor, self._staged = hvd, handle, tensor, staged
        self._done = False

    def test(self) -> bool:
        return self._done or bool(self._hvd.poll(self._handle))

    def wait(self) -> torch.Tensor:
        if not self._done:
            self._hvd.synchronize(self._handle)
            if self._staged is not self._tensor:
                self._tensor.copy_(self._staged)
            self._done = True
            self._staged = None
        return self._tensor


class HorovodComm(Comm):
    backend = "horovod"
    overlap = True

    def __init__(self, world: World, timeout_s: float | None = DEFAULT_TIMEOUT_S):
        hvd = self._hvd = load_horovod()
        # Horovod's stall check warns after HOROVOD_STALL_CHECK_TIME_SECONDS (60) and, with this
        # variable, shuts Horovod down: the pending collective raises instead of waiting forever.
        if timeout_s is not None:
            os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(max(1, int(timeout_s))))
            os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, min(60, int(timeout_s) // 2))))
        # No Horovod tensor fusion unless asked for: GradSync's buckets are fused already, and Horovod
        # re-fusing the buckets that reach it in one cycle adds a copy in and out of its fusion buffer
        # and messages over 32 MB (see docs/dist.md): GradSync.synchronize() of 100 MB on this
        # backend took 2x as long with Horovod's default (128 MB) as with 0 (= the mpi backend's time).
        os.environ.setdefault("HOROVOD_FUSION_THRESHOLD", "0")
        # MPI first, through mpi4py (MCA defaults, MPI_THREAD_MULTIPLE): Horovod adopts an initialized
        # MPI, and abort() / the exit check need mpi4py's COMM_WORLD.
        if hvd.mpi_built():
            self._MPI = load_mpi()
        else:  # a Gloo-only Horovod (horovodrun --gloo): no MPI to abort through
            self._MPI = None
        hvd.init()
        use_cuda = torch.cuda.is_available() and bool(hvd.nccl_built())
        super().__init__(world, timeout_s, f"cuda:{hvd.local_rank()}" if use_cuda else "cpu")
        self._closed = False
        if use_cuda:
            torch.cuda.set_device(self.device)
        if hvd.size() != world.size or hvd.rank() != world.rank:
            raise ValueError(f"Horovod sees rank {hvd.rank()} of {hvd.size()} but the launcher "
                             f"({world.launcher}) says {world.rank} of {world.size}: start the job with "
                             "mpiexec, srun --mpi=pmix or horovodrun")
        self._ops = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}
        self._seq: dict[str, int] = {}                  # signature -> collectives issued so far
        self._pending: dict[str, _HvdHandle] = {}       # name -> in-flight iallreduce_
        self._install_excepthook()

    def _name(self, kind: str, t: torch.Tensor | None = None, op: str = "") -> str:
        """The same name on every rank for the same collective (see the module docstring)."""
        sig = f"hpc.{kind}"
        if t is not None:
            sig += f".{op}.{str(t.dtype).removeprefix('torch.')}.{t.numel()}"
        n = self._seq.get(sig, 0)
        self._seq[sig] = n + 1
        name = f"{sig}.{n % _NAME_CYCLE}"
        earlier = self._pending.pop(name, None)
        if earlier is not None:  # Horovod refuses a name that is still in flight
            earlier.wait()
        return name

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        carry = _CARRY.get(t.dtype, t.dtype)
        if t.device == self.device and t.is_contiguous() and carry == t.dtype:
            return t
        return t.detach().to(self.device, carry).contiguous()

    def allreduce_(self, tensor, op="sum"):
        return self.iallreduce_(tensor, op).wait()

    def iallreduce_(self, tensor, op="sum"):
        staged = self._staged(tensor)
        name = self._name("allreduce", staged, check_op(op))
        handle = _HvdHandle(self._hvd, self._hvd.allreduce_async_(staged, op=self._ops[op], name=name),
                            tensor, staged)
        self._pending[name] = handle
        if len(self._pending) > 64:  # forget the finished ones now and then
            self._pending = {k: h for k, h in self._pending.items() if not h._done}
        return handle

    def broadcast_(self, tensor, root=0):
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of this world (0..{self.size - 1})")
        staged = self._staged(tensor)
        self._hvd.broadcast_(staged, root_rank=root, name=self._name("broadcast", staged))
        if staged is not tensor:
            tensor.copy_(staged)
        return tensor

    def barrier(self):
        self._hvd.barrier()

    def allgather_object(self, obj: Any) -> list:
        return self._hvd.allgather_object(obj, name=self._name("allgather_object"))

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of this world (0..{self.size - 1})")
        return self._hvd.broadcast_object(obj, root_rank=root, name=self._name("broadcast_object"))

    def abort(self, code: int = 1):
        self._flush()
        if self._MPI is not None:
            self._MPI.COMM_WORLD.Abort(code)
        os._exit(code)  # Gloo-only: the launcher notices the exit status

    def close(self):
        if self._closed:
            return
        self._closed = True
        super().close()
        with contextlib.suppress(Exception):
            self._hvd.shutdown()
