"""`hpc submit train|infer|sweep|pipeline`: jobs on Slurm (or locally) without writing sbatch by hand.

See docs/slurm.md. Everything that Slurm or the config would refuse is refused here, before
anything is queued (exit 2 with Slurm's own message and what to change).
"""

from __future__ import annotations

import argparse

from hpc.cli._slurm_options import add_resource_options, print_or_report, report_submitted, resources_from_args
from hpc.cli.ensemble import add_submit_parser
from hpc.cli.infer import parse_infer_args
from hpc.cli.sweep import show


class _Intermixed(argparse.ArgumentParser):
    """Overrides may come after the flags (``hpc submit train c.yaml --nodes 2 optim.lr=0.1``):
    parse each subcommand intermixed (the top-level parser calls parse_known_args on it)."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_inside", False):
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def register(sub) -> None:
    p = sub.add_parser("submit", help="submit training, inference, sweeps and pipelines to Slurm")
    ssub = p.add_subparsers(dest="what", metavar="WHAT", parser_class=_Intermixed)
    t = ssub.add_parser("train", help="a training run (hpc train CONFIG) as a Slurm job")
    t.add_argument("config", help="YAML config (or a shipped config name)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.01")
    add_resource_options(t)
    t.set_defaults(func=_train)

    i = ssub.add_parser("infer", help="batch inference (hpc infer) as a Slurm job",
                        description="Batch inference as a Slurm job: one Slurm task per rank (--nodes N "
                        "--tasks-per-node T: N x T ranks through srun --mpi=pmix, across nodes), or "
                        "--infer-arg=--nproc=N for N local ranks inside one task (docs/infer.md).")
    i.add_argument("--model", required=True, help="NAME@ALIAS or NAME@VERSION")
    i.add_argument("--input", required=True, help="data directory to score")
    i.add_argument("--output", required=True, help="output directory")
    i.add_argument("--infer-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for hpc infer (repeatable), e.g. --infer-arg=--batch-size=512")
    add_resource_options(i)
    i.set_defaults(func=_infer)

    s = ssub.add_parser("sweep", help="a grid of training runs as one job array")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--grid", action="append", default=[], required=True, metavar="KEY=V1,V2",
                   help="a swept config key (repeatable; the grid is their product)")
    s.add_argument("--max-parallel", type=int, default=256, help="members running at once")
    add_resource_options(s)
    s.set_defaults(func=_sweep)

    pl = ssub.add_parser("pipeline", help="train -> register -> infer, chained with afterok")
    pl.add_argument("config", help="training config with registry.name set")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--infer-input", required=True, help="data directory the infer stage scores")
    pl.add_argument("--infer-output", required=True, help="where the infer stage writes")
    pl.add_argument("--alias", default="staging", help="alias the register stage points at the new "
                    "version, and that infer uses (default: registry.alias, else staging)")
    pl.add_argument("--infer-tasks", type=int, default=None, help="ranks of the infer stage (default: as train)")
    add_resource_options(pl)
    pl.set_defaults(func=_pipeline)

    add_submit_parser(ssub, "ensemble")  # = `hpc ensemble submit` (docs/ensembles.md)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _train(args) -> int:
    from hpc.launch.submit import submit_train

    res = resources_from_args(args)
    return print_or_report(submit_train(args.config, args.overrides, res, args.mode, args.dry_run), args)


def _infer(args) -> int:
    from hpc.launch.submit import submit_infer

    res = resources_from_args(args)
    cfg, nproc = parse_infer_args(["--model", args.model, "--input", args.input, "--output", args.output,
                                   *args.infer_arg])
    return print_or_report(submit_infer(cfg, res, args.mode, args.dry_run, nproc=nproc), args)


def _sweep(args) -> int:
    from hpc.launch.submit import submit_sweep

    res = resources_from_args(args)
    out = submit_sweep(args.config, args.overrides, args.grid, res, args.mode, args.dry_run)
    if isinstance(out, str):
        print(out, end="")
        return 0
    sub, sweep_dir = out
    print(f"sweep: {len(sub.jobs)} members; summary: hpc sweep show {sweep_dir}")
    rc = report_submitted(sub, args)
    if args.wait:
        show(sweep_dir)
    return rc


def _pipeline(args) -> int:
    from hpc.launch.submit import submit_pipeline

    if args.mode != "slurm":
        raise ValueError("hpc submit pipeline chains Slurm jobs (afterok): --local/--debug are not supported; "
                         "run hpc train, hpc registry add and hpc infer in turn instead")
    out = submit_pipeline(args.config, args.overrides, resources_from_args(args), args.infer_input,
                          args.infer_output, args.alias, args.infer_tasks, args.dry_run)
    if isinstance(out, str):
        print(out, end="")
        return 0
    print("pipeline: " + " -> ".join(f"{s} {j.job_id}" for s, j in zip(out.stages, out.jobs))
          + " (a failed stage cancels the rest)")
    return report_submitted(out, args)
