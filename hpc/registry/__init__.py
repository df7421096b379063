"""Versioned, checksummed model artifacts (safetensors + JSON, never pickle): see ``store.py``.

Modules, leaf first: ``layout`` (file names, references, checksums), ``card`` (model cards),
``scorers`` (models and scorers built from verified cards), ``store`` (the ``Registry``).
"""

from hpc.registry.layout import IntegrityError, Ref, default_root, parse_ref, verify_dir
from hpc.registry.store import Registry

__all__ = ["IntegrityError", "Ref", "Registry", "default_root", "parse_ref", "verify_dir"]
