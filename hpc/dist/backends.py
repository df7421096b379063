"""``init_comm``: pick the communication backend and start it.

The factory lives apart from the interface (``comm.py``) so imports go one way: every backend
module imports ``comm``, this module imports the backends, and nothing imports it back. Importing a
backend module initializes nothing (mpi4py and horovod are loaded when a communicator is created).
"""

from __future__ import annotations

from hpc.dist.comm import DEFAULT_TIMEOUT_S, Comm, LocalComm
from hpc.dist.horovod_backend import HorovodComm
from hpc.dist.mpi_backend import MPIComm
from hpc.dist.torch_backend import TorchComm
from hpc.dist.world import World, world_from_env

BACKENDS = ("auto", "mpi", "torch", "horovod", "local")


def init_comm(backend: str = "auto", world: World | None = None,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> Comm:
    """Create the communicator; ``auto`` = mpi under an MPI launcher, local for one process.

    ``auto`` with several ranks started by a non-MPI launcher (torchrun, plain srun) picks torch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not known; valid backends: {', '.join(BACKENDS)}")
    world = world or world_from_env()
    if backend == "auto":
        if world.under_mpi:
            backend = "mpi"
        elif world.size > 1:
            backend = "torch"
        else:
            backend = "local"
    if backend == "local":
        return LocalComm(world, timeout_s)
    if backend == "mpi":
        return MPIComm(world, timeout_s)
    if backend == "torch":
        return TorchComm(world, timeout_s)
    assert backend == "horovod", backend
    return HorovodComm(world, timeout_s)
