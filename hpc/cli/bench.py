"""`hpc bench WHAT`: benchmarks that print tables of ratios (ours vs a baseline measured in the same run).

Each benchmark is a module in ``hpc.bench`` exposing ``register(sub)`` (adds ``hpc bench <name>``
with ``func``); they are discovered, so adding one touches no other file.
"""

from __future__ import annotations

import importlib
import pkgutil


def register(sub) -> None:
    import hpc.bench as pkg

    p = sub.add_parser("bench", help="benchmarks (tables of ratios vs baselines measured in the same run)")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"hpc.bench.{info.name}")
        if hasattr(module, "register"):
            module.register(bsub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
