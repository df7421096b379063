"""`hpc train CONFIG [key=value ...] [--nproc N] [--print-config]`: train a model (see docs/train.md)."""

from __future__ import annotations

import argparse
import textwrap

from hpc.cli import EXIT_INTERRUPTED, EXIT_USAGE
from hpc.dist.spawn import launch_local
from hpc.instrument.watchdog import HANG_EXIT_CODE
from hpc.train.config import dump_yaml, load_config
from hpc.train.preempt import EXIT_PREEMPTED

EXIT = {"completed": 0, "failed": 1, "preempted": EXIT_PREEMPTED}   # summary["state"] -> exit status
# Every status `hpc train` ends with, for --help and docs/train.md (from the constants that set them).
EXIT_CODES = (
    (EXIT["completed"], "completed"),
    (EXIT["failed"], "failed at run time: too many non-finite steps, or a rank raised (the job is aborted)"),
    (EXIT_USAGE, "bad usage, config or data, refused before any rank starts work"),
    (EXIT_PREEMPTED, "preempted: checkpointed (and requeued under Slurm); resume=auto continues"),
    (HANG_EXIT_CODE, "hung: the watchdog (monitor.hang_s) wrote hang-report/ and ended the ranks"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)
_OPTIONS = "--nproc N, --print-config, then key=value overrides"


def _exit_codes_text() -> str:
    width = max(len(str(code)) for code, _ in EXIT_CODES) + 2
    lines = [f"  {code:<{width}}{what}" for code, what in EXIT_CODES]
    return "\n".join(["exit status:", *lines,
                      "  with --nproc: mpiexec's, which passes on the first failing rank's status"])


def register(sub) -> None:
    description = ("Train a model family on HDF5 shards with synchronous data parallelism. CONFIG is a "
                   "YAML file or a shipped config name (hpc/configs/*.yaml); key=value pairs override "
                   "dotted keys, e.g. optim.lr=1e-3 train.epochs=3 resume=auto. Each value is read as "
                   "the type its key declares (run_id=007 stays the text 007; quote a value to force a "
                   "string). --nproc and --print-config may come anywhere on the line.")
    p = sub.add_parser("train", help="train a model on 1 process, N MPI ranks or N Slurm tasks",
                       usage="%(prog)s CONFIG [key=value ...] [--nproc N] [--print-config]",
                       description=textwrap.fill(description, 100), epilog=_exit_codes_text(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="YAML file or shipped config name (e.g. digits_cnn)")
    # REMAINDER so that `--nproc N` may come anywhere (argparse cannot interleave options with a
    # variable-length positional list); run() takes the options back out of it (split_options).
    overrides = p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                               help="dotted config overrides (optional)")
    overrides.required = False  # argparse counts a REMAINDER as required ("required: CONFIG, key=value")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="start N local ranks through mpiexec (like horovodrun -np N)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML, after the overrides) and exit 0; trains nothing")
    p.set_defaults(func=run)


def split_options(items: list[str], nproc: int | None,
                  print_config: bool = False) -> tuple[list[str], int | None, bool]:
    """Pull ``--nproc N`` / ``--nproc=N`` and ``--print-config`` out of the overrides (pure)."""
    out, it = [], iter(items)
    for item in it:
        if item == "--nproc" or item.startswith("--nproc="):
            value = item.split("=", 1)[1] if "=" in item else next(it, None)
            try:
                nproc = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"--nproc {value!r}: must be a positive integer number of ranks") from None
        elif item == "--print-config":
            print_config = True
        elif item.startswith("-"):
            raise ValueError(f"unknown option {item!r}; valid: {_OPTIONS}")
        else:
            out.append(item)
    return out, nproc, print_config


def run(args) -> int:
    args.overrides, args.nproc, args.print_config = split_options(args.overrides, args.nproc,
                                                                  args.print_config)

    cfg = load_config(args.config, args.overrides)  # ValueError -> exit 2 before any rank starts
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    # Here, not at the top: every `hpc` command imports this module, and these import torch
    # (1.5-3 s measured with `python -X importtime`).
    from hpc.train.runner import preflight

    if args.nproc is not None:
        if args.nproc < 1:
            raise ValueError(f"--nproc {args.nproc}: must be >= 1")
        preflight(cfg, args.nproc)
        return launch_local(args.nproc, ["train", args.config, *args.overrides])
    # Only where a rank trains: the launcher (submitit, hpc.infer for the requeue) is not needed
    # by the `--nproc` parent.
    from hpc.launch.tasks import run_training

    # Each rank (under mpiexec, srun or alone): train, then (under Slurm) rank 0 requeues a
    # preempted run, so plain `sbatch`/`srun hpc train` users get requeues too.
    summary = run_training(cfg)
    return EXIT.get(summary.get("state"), EXIT["failed"])
