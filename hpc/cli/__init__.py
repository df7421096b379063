"""The `hpc` command line: a thin layer over the pipeline stages.

Each subcommand lives in its own module in this package and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func=callable(args) -> int``.
Modules are discovered, so adding a subcommand touches no other file.

Exit codes: 0 success; 1 a job failed at run time; 2 bad usage or bad input (argparse errors,
and any ``ValueError`` a stage raises for user input, printed as ``hpc <cmd>: error: ...``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from hpc import __version__

# Start-up: build_parser() imports every command module, so `hpc --help`, `hpc status` and every
# other command pay for what any command module imports at its top. So command modules import at the
# top only what loads no torch, numpy, h5py or submitit (the standard library, hpc.util, hpc.cli,
# hpc.dist.world/spawn, hpc.train.config), and everything that does (hpc.launch, hpc.infer,
# hpc.registry, hpc.data, hpc.monitor, hpc.ensemble, ...) inside the command function that uses it.
# Measured on this 2-core machine: `hpc --help` 0.14-0.23 s; with the modules the commands use
# imported (hpc.launch.submit/schedule, hpc.infer.job, hpc.registry, hpc.monitor.*, hpc.data.*,
# hpc.ensemble.spec, ...) 1.6-3.2 s, torch alone ~1 s.

EXIT_USAGE = 2          # bad usage or bad input (argparse errors, a ValueError for user input)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, what a shell reports)


class UsageError(ValueError):
    """Bad input from the user: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc",
        description="HPC batch jobs: data -> train -> registry -> infer, on 1 process, "
        "N MPI ranks or N Slurm tasks with the same config.",
    )
    parser.add_argument("--version", action="version", version=f"hpc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"hpc {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"hpc {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
