"""Versions and code identity recorded in manifests, run summaries and model cards."""

from __future__ import annotations

import getpass
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from hpc import __version__

_PACKAGES = ("torch", "numpy", "h5py", "mpi4py", "safetensors", "pyarrow", "submitit", "cupy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "hpc": _hpc_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _hpc_version() -> str:
    return __version__


def code_version() -> str | None:
    """The git commit of the source tree (with '-dirty' when modified), or None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry inside some containers
        return os.environ.get("USER", "unknown")


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
