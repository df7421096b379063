"""Batch inference (`hpc infer`): ``job.run(InferConfig)``; see docs/infer.md."""

from __future__ import annotations

import sys
import types


def run(model: str, input, output, log=print, **options) -> dict:
    """Score the split ``input`` with ``model`` (NAME@ALIAS) into ``output``, as ``hpc infer``
    does; ``options``: the other fields of ``hpc.infer.job.InferConfig``. Returns the job summary."""
    from hpc.infer.job import InferConfig, run as run_job  # here: torch (docs/DESIGN.md, lazy imports)

    return run_job(InferConfig(model=model, input=str(input), output=str(output), **options), log=log)


class _Package(types.ModuleType):
    def __call__(self, *args, **kwargs):  # the Python API's hpc.infer(...) is hpc.infer.run(...)
        return self.run(*args, **kwargs)


sys.modules[__name__].__class__ = _Package
