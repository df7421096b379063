"""`hpc train CONFIG [key=value ...] [--nproc N]`: train a model (see docs/train.md)."""

from __future__ import annotations

import argparse

EXIT = {"completed": 0, "failed": 1, "preempted": 3}


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model on 1 process, N MPI ranks or N Slurm tasks",
                       description="Train a model family on HDF5 shards with synchronous data parallelism. "
                       "CONFIG is a YAML file or a shipped config name (hpc/configs/*.yaml); "
                       "key=value pairs override dotted keys, e.g. optim.lr=0.05 train.epochs=3 resume=auto. "
                       "Exit status: 0 completed, 1 failed, 2 bad config, 3 preempted (checkpointed).")
    p.add_argument("config", help="YAML file or shipped config name (e.g. digits_cnn)")
    # REMAINDER so that `--nproc N` may come anywhere (argparse cannot interleave options with a
    # variable-length positional list); run() takes --nproc back out of it.
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value", help="dotted config overrides")
    p.add_argument("--nproc", type=int, default=None,
                   help="start N local ranks through mpiexec (like horovodrun -np N)")
    p.set_defaults(func=run)


def split_nproc(items: list[str], nproc: int | None) -> tuple[list[str], int | None]:
    """Pull ``--nproc N`` / ``--nproc=N`` out of the overrides (pure)."""
    out, it = [], iter(items)
    for item in it:
        if item == "--nproc" or item.startswith("--nproc="):
            value = item.split("=", 1)[1] if "=" in item else next(it, None)
            try:
                nproc = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"--nproc {value!r}: must be a positive integer number of ranks") from None
        elif item.startswith("-"):
            raise ValueError(f"unknown option {item!r}; valid: --nproc N, then key=value overrides")
        else:
            out.append(item)
    return out, nproc


def run(args) -> int:
    from hpc.train.config import load_config
    from hpc.train.runner import preflight

    args.overrides, args.nproc = split_nproc(args.overrides, args.nproc)

    cfg = load_config(args.config, args.overrides)  # ValueError -> exit 2 before any rank starts
    if args.nproc is not None:
        if args.nproc < 1:
            raise ValueError(f"--nproc {args.nproc}: must be >= 1")
        preflight(cfg, args.nproc)
        from hpc.dist.launch import launch_local

        return launch_local(args.nproc, ["train", args.config, *args.overrides])
    from hpc.train import run as train

    summary = train(cfg)
    return EXIT.get(summary.get("state"), 1)
