"""Model families behind a name -> builder registry (see ``families.py``); ``ops`` holds the
layers with a CuPy fast path; ``combine`` combines member outputs into an ensemble's output."""

from hpc.models.families import build_model, list_models, register_model, task_of

__all__ = ["build_model", "list_models", "register_model", "task_of"]
