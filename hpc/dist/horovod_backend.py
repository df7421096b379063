"""Horovod backend through horovod.torch (an optional extra: nothing else in the suite needs Horovod).

Launch as for MPI (``mpiexec -n N`` / ``srun --mpi=pmix``, or ``horovodrun``); Horovod reads its own
rank variables, checked against the ``World``. Horovod's background thread runs the collectives,
so ``iallreduce_`` overlaps with computation. Not exercised by the test suite unless Horovod is
installed (its build takes ~10 minutes; recipe in docs/dist.md).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from typing import Any

import torch

from hpc.dist.comm import DEFAULT_TIMEOUT_S, Comm, Handle, check_op
from hpc.dist.world import World

INSTALL_HINT = (
    "backend 'horovod' needs horovod.torch, which is not importable ({err}). Install it with "
    "HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 "
    "pip install --no-cache-dir 'hpc-model-pipeline[horovod]' (a source build, ~10 min; see docs/dist.md for the "
    "CMake fixes it needs), or use backend mpi or torch")


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
        return self._done or self._hvd.poll(self._handle)

    def wait(self) -> torch.Tensor:
        if not self._done:
            self._hvd.synchronize(self._handle)
            if self._staged is not self._tensor:
                self._tensor.copy_(self._staged)
            self._done = True
        return self._tensor


class HorovodComm(Comm):
    backend = "horovod"
    overlap = True

    def __init__(self, world: World, timeout_s: float | None = DEFAULT_TIMEOUT_S):
        hvd = self._hvd = load_horovod()
        # Horovod's stall check warns, then (with this variable) shuts the job down: our timeout.
        if timeout_s is not None:
            os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(int(timeout_s)))
        hvd.init()
        use_cuda = torch.cuda.is_available() and hvd.nccl_built()
        super().__init__(world, timeout_s, f"cuda:{hvd.local_rank()}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if hvd.size() != world.size or hvd.rank() != world.rank:
            raise ValueError(f"Horovod sees rank {hvd.rank()} of {hvd.size()} but the launcher "
                             f"({world.launcher}) says {world.rank} of {world.size}")
        self._ops = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}
        self._names = itertools.count()  # Horovod matches tensors across ranks by name
        self._install_excepthook()

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.device and t.is_contiguous():
            return t
        return t.detach().to(self.device).contiguous()

    def allreduce_(self, tensor, op="sum"):
        return self.iallreduce_(tensor, op).wait()

    def iallreduce_(self, tensor, op="sum"):
        staged = self._staged(tensor)
        handle = self._hvd.allreduce_async_(staged, op=self._ops[check_op(op)],
                                            name=f"hpc.allreduce.{next(self._names)}")
        return _HvdHandle(self._hvd, handle, tensor, staged)

    def broadcast_(self, tensor, root=0):
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of this world (0..{self.size - 1})")
        staged = self._staged(tensor)
        self._hvd.broadcast_(staged, root_rank=root, name=f"hpc.broadcast.{next(self._names)}")
        if staged is not tensor:
            tensor.copy_(staged)
        return tensor

    def barrier(self):
        self._hvd.barrier()

    def allgather_object(self, obj: Any) -> list:
        return self._hvd.allgather_object(obj, name=f"hpc.allgather.{next(self._names)}")

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self._hvd.broadcast_object(obj, root_rank=root, name=f"hpc.bcast.{next(self._names)}")

    def abort(self, code: int = 1):
        self._flush()
        if "mpi4py.MPI" in sys.modules:
            sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)
        os._exit(code)

    def close(self):
        super().close()
        with contextlib.suppress(Exception):
            self._hvd.shutdown()
