"""Model families behind a name -> builder registry (see ``registry.py``); ``ops`` holds the
layers with a CuPy fast path."""

from hpc.models.families import build_model, list_models, register_model, task_of

__all__ = ["build_model", "list_models", "register_model", "task_of"]
