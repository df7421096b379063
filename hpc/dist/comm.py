"""The communication interface every backend implements (``init_comm`` in ``backends.py`` picks one).

One small interface (allreduce, broadcast, barrier, allgather) so the trainer and ``GradSync`` never
know which library moves the bytes:

| backend | library | when |
|---|---|---|
| ``local`` | none | ``auto`` for one process outside an MPI launcher |
| ``mpi`` | mpi4py over the tensors' memory (no copies for contiguous CPU tensors) | ``auto`` under mpiexec / srun --mpi=pmix |
| ``torch`` | torch.distributed: gloo on CPU, NCCL on GPU | ``auto`` for several ranks from torchrun / plain srun |
| ``horovod`` | horovod.torch (optional extra) | asked for |

Tensors are modified in place (``allreduce_``/``broadcast_`` return the same tensor). Collectives
must be called in the same order on every rank (MPI semantics); ``GradSync`` guarantees that for its
buckets.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import sys
from typing import Any, NoReturn

import torch

from hpc.dist.world import World

OPS = ("sum", "max", "min")
# A collective that waits longer than this has a dead or stuck peer: fail instead of hanging until
# the walltime. Generous because rank 0 may legitimately be slow (checkpoint writes, validation).
DEFAULT_TIMEOUT_S = 600.0


def check_op(op: str) -> str:
    if op not in OPS:
        raise ValueError(f"reduction op {op!r} is not supported; valid ops: {', '.join(OPS)}")
    return op


class Handle(abc.ABC):
    """An in-flight ``iallreduce_``: ``wait()`` blocks until the tensor holds the result."""

    @abc.abstractmethod
    def wait(self) -> torch.Tensor: ...

    def test(self) -> bool:
        """Drive progress without blocking (MPI progresses only inside MPI calls); True when done."""
        return False


class DoneHandle(Handle):
    """A handle whose operation already completed (local backend, blocking fallbacks)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def wait(self) -> torch.Tensor:
        return self.tensor

    def test(self) -> bool:
        return True


class Comm(abc.ABC):
    """A communicator over all ranks of the job (see the module docstring for the backends)."""

    backend: str = "?"
    # True when iallreduce_ makes progress while the caller computes (GradSync then starts bucket
    # reductions during backward); False means iallreduce_ is blocking and GradSync waits to the end.
    overlap: bool = False

    def __init__(self, world: World, timeout_s: float = DEFAULT_TIMEOUT_S,
                 device: torch.device | str = "cpu"):
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s!r}: must be a positive number of seconds")
        self.world = world
        self.timeout_s = timeout_s
        # Where tensors passed to this backend must live (cuda:<local rank> for NCCL).
        self.device = torch.device(device)
        self._prev_hook = None  # sys.excepthook before ours (see _install_excepthook)

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size

    @abc.abstractmethod
    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor: ...

    def iallreduce_(self, tensor: torch.Tensor, op: str = "sum") -> Handle:
        """Start an in-place allreduce; default: blocking, returned as a completed handle."""
        return DoneHandle(self.allreduce_(tensor, op))

    @abc.abstractmethod
    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor: ...

    @abc.abstractmethod
    def barrier(self) -> None: ...

    @abc.abstractmethod
    def allgather_object(self, obj: Any) -> list: ...

    @abc.abstractmethod
    def broadcast_object(self, obj: Any, root: int = 0) -> Any: ...

    @abc.abstractmethod
    def abort(self, code: int = 1) -> NoReturn: ...

    def close(self) -> None:
        """Release the backend's resources (idempotent)."""
        self._uninstall_excepthook()

    # An unhandled exception on one rank would leave the others blocked in their next collective
    # until the walltime: with several ranks, the hook prints the traceback, names the rank and
    # aborts the whole job (MPI_Abort where MPI is up). Likewise a rank that exits early (sys.exit,
    # a return on one rank only) without close(): mpiexec does not end the job for a rank that
    # finalized MPI, so the atexit check aborts it. Both are removed by close().
    def _install_excepthook(self) -> None:
        if self.size > 1 and self._prev_hook is None:
            self._prev_hook = sys.excepthook
            sys.excepthook = self._excepthook
            if "mpi4py.MPI" in sys.modules:
                atexit.register(self._exit_without_close)

    def _uninstall_excepthook(self) -> None:
        if self._prev_hook is not None and sys.excepthook == self._excepthook:
            sys.excepthook = self._prev_hook
        self._prev_hook = None
        atexit.unregister(self._exit_without_close)

    def _exit_without_close(self) -> None:
        sys.stderr.write(f"hpc: rank {self.rank}/{self.size} ({self.world.node_name}) is exiting without "
                         "comm.close() (an early exit on this rank?); aborting the job so the other ranks "
                         "do not wait for it\n")
        self.abort(1)

    def _excepthook(self, etype, value, tb) -> None:
        try:
            (self._prev_hook or sys.__excepthook__)(etype, value, tb)
            sys.stderr.write(f"hpc: rank {self.rank}/{self.size} ({self.world.node_name}) failed with an "
                             f"unhandled {etype.__name__}: {value}; aborting the job ({self.backend} backend) "
                             "so the other ranks stop instead of hanging\n")
        finally:
            self.abort(1)

    @staticmethod
    def _flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()

    def __enter__(self) -> "Comm":
        return self

    def __exit__(self, etype, value, tb) -> None:
        # On an exception stay open: the abort-on-exception hook must still end the other ranks.
        if etype is None:
            self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.backend} rank={self.rank}/{self.size}>"


class LocalComm(Comm):
    """One process: every collective is the identity, so code paths stay the same for 1 rank."""

    backend = "local"
    overlap = False

    def __init__(self, world: World | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        world = world or World()
        if world.size != 1:
            raise ValueError(f"backend 'local' runs one process, but the launcher ({world.launcher}) "
                             f"started {world.size} ranks; use backend mpi, torch or horovod")
        super().__init__(world, timeout_s)

    def allreduce_(self, tensor, op="sum"):
        check_op(op)
        return tensor

    def broadcast_(self, tensor, root=0):
        if root != 0:
            raise ValueError(f"broadcast root {root} does not exist in a world of size 1")
        return tensor

    def barrier(self):
        pass

    def allgather_object(self, obj):
        return [obj]

    def broadcast_object(self, obj, root=0):
        return obj

    def abort(self, code=1):
        raise SystemExit(code)
