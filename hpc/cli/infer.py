"""`hpc infer`: score a sharded data split with registered model(s), exactly once (docs/infer.md)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("infer", help="batch inference: registered model(s) x data shards -> "
                       "one partition per shard, _MANIFEST.json, _SUCCESS")
    p.add_argument("--model", required=True, metavar="REF",
                   help="NAME@ALIAS or NAME@VERSION; comma-separated for an ensemble (a@production,b@3)")
    p.add_argument("--input", required=True, metavar="DATA_DIR", help="a split directory (with manifest.json)")
    p.add_argument("--output", required=True, metavar="OUT_DIR")
    p.add_argument("--format", default="parquet", choices=("parquet", "hdf5", "csv"))
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="write the K most probable classes instead of every probability (0: all)")
    p.add_argument("--combine", choices=("mean", "vote"), default=None,
                   help="how several --model references are combined (default mean)")
    p.add_argument("--nproc", type=int, default=1, help="start N local ranks through mpiexec")
    p.add_argument("--allow-unpromoted", action="store_true",
                   help="accept a version no alias points to")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output directory written by another model, input or settings")
    p.add_argument("--registry", metavar="DIR", default=None,
                   help="registry root (default: $HPC_REGISTRY or ./registry)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=run)


def config_from_args(args):
    from hpc.infer.job import InferConfig

    return InferConfig(model=args.model, input=args.input, output=args.output, format=args.format,
                       batch_size=args.batch_size, top_k=args.top_k, combine=args.combine,
                       allow_unpromoted=args.allow_unpromoted, overwrite=args.overwrite,
                       registry=args.registry, device=args.device)


def rank_argv(args) -> list[str]:
    """The command line each rank runs under ``--nproc`` (the same job, without --nproc)."""
    argv = ["infer", "--model", args.model, "--input", args.input, "--output", args.output,
            "--format", args.format, "--batch-size", str(args.batch_size), "--top-k", str(args.top_k),
            "--device", args.device]
    for flag, value in (("--combine", args.combine), ("--registry", args.registry)):
        if value is not None:
            argv += [flag, value]
    argv += [f for f, on in (("--allow-unpromoted", args.allow_unpromoted),
                             ("--overwrite", args.overwrite)) if on]
    return argv


def run(args) -> int:
    from hpc.dist import launch_local, world_from_env

    from hpc.util.progress import progress_interval_s

    cfg = config_from_args(args)  # validate before starting ranks
    progress_interval_s()  # here, where every rank checks it alike: only rank 0 reports progress
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: must be >= 1")
    if args.nproc > 1 and world_from_env().size == 1:
        return launch_local(args.nproc, rank_argv(args))
    from hpc.infer.job import run as run_job

    run_job(cfg, progress=True)
    return 0
