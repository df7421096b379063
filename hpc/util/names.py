"""The one rule for names that become path components: run names and ids (``runs/NAME/ID``),
registry model names and aliases (``registry/NAME``), ensemble names.

A name starts with a letter or digit and continues with letters, digits, ``.``, ``_``, ``-``
(at most 100 characters; aliases start with a letter, at most 64): never empty, ``.`` or ``..``,
no path separator, no whitespace or control characters. Pure.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
RULE = "letters, digits, '.', '_', '-', starting with a letter or digit, at most 100 characters"


def is_name(value: object, pattern: re.Pattern = NAME_RE) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None and value not in (".", "..")


def check_name(value: object, what: str, pattern: re.Pattern = NAME_RE) -> str:
    """``value`` if it is a safe name, else ValueError naming ``what`` and the rule."""
    if not is_name(value, pattern):
        raise ValueError(f"{what}: {value!r} is not a valid name ({RULE}; matches {pattern.pattern}); "
                         "it becomes a directory name")
    return value
