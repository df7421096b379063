"""`hpc infer`: score a sharded data split or tables (CSV/Parquet) with registered model(s), exactly
once (docs/infer.md)."""

from __future__ import annotations

import argparse
import os

from hpc.dist import launch_local, world_from_env
from hpc.util.progress import progress_interval_s


def register(sub) -> None:
    p = sub.add_parser("infer", help="batch inference: registered model(s) x data shards or tables -> "
                       "one partition per shard or file, _MANIFEST.json, _SUCCESS")
    add_infer_arguments(p)
    p.set_defaults(func=run)


def add_infer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="REF",
                   help="NAME@ALIAS or NAME@VERSION; comma-separated for an ensemble (a@production,b@3)")
    p.add_argument("--input", required=True, metavar="INPUT",
                   help="a split directory (with manifest.json), or a table: a .csv/.parquet file or a "
                        "directory of them (read with the model's recorded table transform; one output "
                        "partition per file)")
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
                   help="replace an output directory written by another model, input or settings, or "
                        "holding output-named files (part-*, _SUCCESS, ...) without hpc infer's _JOB.json: "
                        "removes those files and names them")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="publish NaN/inf predictions (refused by default, naming the partition)")
    p.add_argument("--registry", metavar="DIR", default=None,
                   help="registry root (default: $HPC_REGISTRY or ./registry)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--trust-plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE named by a card's training config even if it is not an installed "
                        "module (e.g. it lies in the working directory); docs/registry.md")


def config_from_args(args):
    """The typed job config of parsed `hpc infer` arguments (ValueError for a bad value)."""
    from hpc.infer.job import InferConfig

    return InferConfig(model=args.model, input=args.input, output=args.output, format=args.format,
                       batch_size=args.batch_size, top_k=args.top_k, combine=args.combine,
                       allow_unpromoted=args.allow_unpromoted, overwrite=args.overwrite,
                       registry=args.registry, device=args.device,
                       allow_nonfinite=args.allow_nonfinite)


def parse_infer_args(argv: list[str]):
    """(config, nproc) of `hpc infer ARGV` (for `hpc submit infer`): what `hpc infer` would refuse
    is a ValueError, so nothing is queued."""
    p = argparse.ArgumentParser(prog="hpc infer")
    add_infer_arguments(p)
    try:
        args = p.parse_args(argv)
    except SystemExit:  # argparse printed what is wrong
        raise ValueError("the `hpc infer` arguments above are invalid (see `hpc infer --help`)") from None
    return config_from_args(args), args.nproc


def trust_plugins_from_args(args) -> None:
    """--trust-plugin: through the environment, so the ranks mpiexec starts inherit it."""
    names = [m for m in getattr(args, "trust_plugin", None) or [] if m]
    if names:
        os.environ["HPC_TRUST_PLUGINS"] = ",".join(names)


def run(args) -> int:
    from hpc.launch.tasks import infer_argv

    cfg = config_from_args(args)  # validate before starting ranks
    trust_plugins_from_args(args)
    progress_interval_s()  # here, where every rank checks it alike: only rank 0 reports progress
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: must be >= 1")
    from hpc.infer.job import preflight, run as run_job

    if args.nproc > 1 and world_from_env().size == 1:
        preflight(cfg)  # bad input: exit 2 here, before any rank starts
        return launch_local(args.nproc, infer_argv(cfg))  # each rank: the same job, without --nproc

    run_job(cfg, progress=True)
    return 0
