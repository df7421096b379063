"""Versioned, checksummed model artifacts (safetensors + JSON, never pickle): see ``store.py``."""

from hpc.registry.store import IntegrityError, Ref, Registry, default_root, parse_ref, verify_dir

__all__ = ["IntegrityError", "Ref", "Registry", "default_root", "parse_ref", "verify_dir"]
