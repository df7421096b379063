"""Slurm's time syntax, parsed in one place (pure): sbatch's ``--time`` and what squeue/scontrol print.

Forms (``man sbatch``): ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``, and ``UNLIMITED`` /
``INFINITE`` (no limit). squeue's ``%L``/``%l`` and scontrol's ``TimeLimit=`` use the same forms.
"""

from __future__ import annotations

import re

UNLIMITED = "UNLIMITED"
_NO_LIMIT = {"UNLIMITED", "INFINITE"}
_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def parse_slurm_time(spec: str) -> int | None:
    """Seconds of a Slurm time, None for UNLIMITED/INFINITE; ValueError for anything else.

    ``"30"`` -> 1800 (plain numbers are minutes), ``"4:59"`` -> 299 (M:S), ``"2:00:00"`` -> 7200,
    ``"1-0"`` -> 86400 (D-H), ``"1-02:03:04"`` -> 93784.
    """
    text = str(spec).strip()
    if text.upper() in _NO_LIMIT:
        return None
    m = _TIME.match(text)
    if not m:
        raise ValueError(f"{spec!r} is not a Slurm time; use MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                         "D-HH:MM:SS or UNLIMITED (e.g. 30, 2:00:00, 1-12:00:00)")
    d, a, b, c = (int(m.group(k)) if m.group(k) else None for k in "dabc")
    if d is not None:  # D-H[:M[:S]]
        return d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    if b is not None:  # M:S
        return a * 60 + b
    return a * 60      # M
