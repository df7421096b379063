"""hpc: HPC batch jobs that train and score big models (data -> train -> registry -> infer).

From Python (``hpc/api.py``, imported on first use: ``import hpc`` and ``hpc --help`` load no torch)::

    import hpc
    m = hpc.load("digits@production")     # verified like every load; root: $HPC_REGISTRY or root=
    m.predict(x)                          # numpy array, torch tensor or pandas DataFrame -> numpy
    hpc.train("digits_cnn", ["train.epochs=3"])                 # hpc.train.run: one run on this rank
    hpc.infer("digits@production", "data/digits/test", "out/")  # hpc.infer.run: the `hpc infer` job
    hpc.export("digits@production", "export/", format="onnx")   # `hpc registry export`
"""

__version__ = "0.1.0"

_API = ("Model", "export", "load")  # from hpc.api
_STAGES = ("infer", "train")        # packages that are also callable: hpc.train(...) = hpc.train.run(...)


def __getattr__(name: str):
    # PEP 562: the API and the stage packages are imported on first use (hpc.api imports torch,
    # ~1-2 s). By module name, not `from hpc import ...`: hpc.util and hpc.registry import this
    # package for __version__ and must not depend on the layers above them (lint-imports).
    import importlib

    if name in _API:
        return getattr(importlib.import_module("hpc.api"), name)
    if name in _STAGES:
        return importlib.import_module(f"hpc.{name}")
    raise AttributeError(f"module 'hpc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API, *_STAGES})
