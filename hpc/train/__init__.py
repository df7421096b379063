"""Distributed data-parallel training (docs/train.md).

``run(config, overrides=()) -> summary`` trains one run on this rank, wherever it was started (the
world comes from ``hpc.dist.world``). Launchers call it through ``hpc.launch.tasks.run_training``,
which adds what depends on the launch: the Slurm requeue after a preemption or a hang.
"""

from __future__ import annotations

import sys
import types


def run(config, overrides=(), data=None, on_hang=None) -> dict:
    """Train one run on this rank; returns the run summary (``summary.json``'s content).

    ``config``: a YAML path, a shipped config name, a dict or a ``TrainConfig``; ``overrides``:
    dotted ``key=value`` strings. ``data``: an optional ``hpc.train.inputs.Data`` (tests and
    benchmarks inject in-memory readers). ``on_hang(report)``: called by the hang watchdog before
    the hung process exits, when ``monitor.on_hang=requeue``. A rank that raises while others run
    calls the communicator's abort, so the job ends non-zero everywhere instead of hanging.
    """
    # Here, not at the top: `import hpc.train.config` (hpc status, hpc submit, the CLI) would
    # otherwise import torch through the runner (1.3-1.7 s measured with `python -X importtime`).
    from hpc.train.runner import run as _run

    return _run(config, overrides, data, on_hang)


__all__ = ["run"]


class _Package(types.ModuleType):
    def __call__(self, *args, **kwargs):  # the Python API's hpc.train(...) is hpc.train.run(...)
        return self.run(*args, **kwargs)


sys.modules[__name__].__class__ = _Package
