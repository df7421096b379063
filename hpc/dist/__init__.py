"""Distributed execution: who am I (``world``), how ranks talk (``comm`` + backends), gradient fusion.

The one place in the suite that knows MPI, torch.distributed, Horovod and launcher variables; see
docs/DESIGN.md (contract ``hpc.dist``) and docs/dist.md. Names are resolved lazily (PEP 562): importing
``hpc.dist`` or ``hpc.dist.world``/``hpc.dist.spawn`` costs no torch import (``hpc doctor``, sbatch
rendering stay fast), and no backend is imported, so MPI is initialized only by ``init_comm``
(``backends.py``: the factory, apart from the ``comm.py`` interface the backends import).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "World": "world", "world_from_env": "world", "mpi_env_for_root": "world", "expand_nodelist": "world",
    "launch_local": "spawn",
    "assign_buckets": "buckets",
    "DEFAULT_TIMEOUT_S": "comm", "OPS": "comm", "Comm": "comm", "Handle": "comm", "LocalComm": "comm",
    "BACKENDS": "backends", "init_comm": "backends",
    "DEFAULT_BUCKET_MB": "grad_sync", "GradSync": "grad_sync", "broadcast_parameters": "grad_sync",
    "broadcast_optimizer_state": "grad_sync", "broadcast_tensors": "grad_sync",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hpc.dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hpc.dist.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
