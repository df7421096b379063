"""Distributed data-parallel training (docs/train.md).

``run(config, overrides=()) -> summary`` is the entry point for every launcher: the CLI, each
rank under mpiexec, and each Slurm task (``hpc.launch``); the world comes from ``hpc.dist.world``.
"""

from __future__ import annotations


def run(config, overrides=(), data=None) -> dict:
    """Train one run on this rank; returns the run summary (``summary.json``'s content).

    ``config``: a YAML path, a shipped config name, a dict or a ``TrainConfig``; ``overrides``:
    dotted ``key=value`` strings. ``data``: an optional ``hpc.train.inputs.Data`` (tests and
    benchmarks inject in-memory readers). A rank that raises while others run calls the
    communicator's abort, so the job ends non-zero everywhere instead of hanging.
    """
    from hpc.train.runner import run as _run

    return _run(config, overrides, data)


__all__ = ["run"]
