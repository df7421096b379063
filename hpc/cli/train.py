"""`hpc train CONFIG [key=value ...] [--nproc N]`: train a model (see docs/train.md)."""

from __future__ import annotations

EXIT = {"completed": 0, "failed": 1, "preempted": 3}


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model on 1 process, N MPI ranks or N Slurm tasks",
                       description="Train a model family on HDF5 shards with synchronous data parallelism. "
                       "CONFIG is a YAML file or a shipped config name (hpc/configs/*.yaml); "
                       "key=value pairs override dotted keys, e.g. optim.lr=0.05 train.epochs=3 resume=auto. "
                       "Exit status: 0 completed, 1 failed, 2 bad config, 3 preempted (checkpointed).")
    p.add_argument("config", help="YAML file or shipped config name (e.g. digits_cnn)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--nproc", type=int, default=None,
                   help="start N local ranks through mpiexec (like horovodrun -np N)")
    p.set_defaults(func=run)


def run(args) -> int:
    from hpc.train.config import load_config
    from hpc.train.runner import preflight

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
