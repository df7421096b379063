"""Printing a benchmark's table and writing its JSON (shared by every `hpc bench` module)."""

from __future__ import annotations

from typing import Any, Sequence

from hpc.util.io import atomic_write_json


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def emit(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], result: dict,
         json_path: str | None) -> None:
    print(title)
    print(format_table(headers, rows))
    if json_path:
        atomic_write_json(json_path, result)
        print(f"wrote {json_path}")
