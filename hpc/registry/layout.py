"""The registry's on-disk layout and its integrity checks (the leaf of ``hpc.registry``).

File names of a version directory, the name/alias rules, references (``Ref``, ``parse_ref``), the
``SHA256SUMS`` format, and verification: ``verify_dir`` (every file of a version) and
``read_verified`` (the bytes of one file, hashed as read). See ``store.py`` for the layout itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hpc.util.io import sha256_bytes, sha256_file
from hpc.util.names import ALIAS_RE, NAME_RE

CARD = "model.json"
WEIGHTS = "model.safetensors"
META = "meta.safetensors"  # a stacking ensemble's meta-model
SUMS = "SHA256SUMS"
CARD_FORMAT = 1
SOURCES = ("best", "last")
# NAME_RE / ALIAS_RE: the one name rule (hpc.util.names), shared with run names and ensembles.


class IntegrityError(ValueError):
    """An artifact on disk does not match its checksums (a user-visible refusal, exit 2)."""


def default_root() -> Path:
    return Path(os.environ.get("HPC_REGISTRY") or "registry")


@dataclass(frozen=True)
class Ref:
    name: str
    version: int


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"NAME@ALIAS"``, ``"NAME@3"`` or ``"NAME"`` -> (name, selector or None). Pure."""
    name, _, sel = ref.strip().partition("@")
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"model reference {ref!r}: name {name!r} must match {NAME_RE.pattern} "
                         "(use NAME@ALIAS or NAME@VERSION)")
    if _ and not sel:
        raise ValueError(f"model reference {ref!r}: nothing after '@' (use NAME@ALIAS or NAME@VERSION)")
    return name, (sel or None)


def parse_sums(text: str, where: str) -> dict[str, str]:
    """Parse `sha256sum` output (``HEX  FILE`` per line) into {file: hex}. Pure."""
    out: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if not m or "/" in m.group(2) or m.group(2) in (".", ".."):
            raise IntegrityError(f"{where}: line {i} is not 'SHA256  FILE': {line[:80]!r}")
        out[m.group(2)] = m.group(1)
    return out


def format_sums(sums: dict[str, str]) -> str:
    return "".join(f"{h}  {f}\n" for f, h in sorted(sums.items()))


def verify_dir(vdir: Path) -> list[str]:
    """Every problem of one version directory, each naming its file (empty list: intact).

    Symlinks are refused outright (a link could point the checksum at one file and the loader at
    another); any file not listed in SHA256SUMS is an 'extra file' (a planted pickle is refused
    here before anything reads it).
    """
    if vdir.is_symlink():
        return [f"{vdir}: is a symlink (refused)"]
    sums_path = vdir / SUMS
    if sums_path.is_symlink():
        return [f"{sums_path}: is a symlink (refused)"]
    if not sums_path.is_file():
        return [f"{sums_path}: missing"]
    listed = parse_sums(sums_path.read_text(encoding="utf-8", errors="replace"), str(sums_path))
    problems = []
    present = set()
    for entry in sorted(os.scandir(vdir), key=lambda e: e.name):
        if entry.name == SUMS:
            continue
        present.add(entry.name)
        if entry.is_symlink():
            problems.append(f"{vdir / entry.name}: is a symlink (refused)")
        elif not entry.is_file():
            problems.append(f"{vdir / entry.name}: extra entry (not a regular file, not in {SUMS})")
        elif entry.name not in listed:
            problems.append(f"{vdir / entry.name}: extra file (not in {SUMS})")
        elif sha256_file(entry.path) != listed[entry.name]:
            problems.append(f"{vdir / entry.name}: changed (sha256 does not match {SUMS})")
    for name in sorted(set(listed) - present):
        problems.append(f"{vdir / name}: missing (listed in {SUMS})")
    return problems


def read_verified(vdir: Path, fname: str) -> bytes:
    """The bytes of one artifact file, hashed as read and compared with SHA256SUMS.

    Hashing the very bytes we deserialize (not the file again later) means a swap between
    ``verify`` and load cannot slip through; it costs one in-memory copy of the file while loading.
    """
    data = (vdir / fname).read_bytes()
    want = parse_sums((vdir / SUMS).read_text(encoding="utf-8"), str(vdir / SUMS)).get(fname)
    if want is None or sha256_bytes(data) != want:
        raise IntegrityError(f"{vdir / fname}: changed (sha256 does not match {SUMS})")
    return data
