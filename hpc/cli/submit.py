"""`hpc submit train|infer|sweep|pipeline`: jobs on Slurm (or locally) without writing sbatch by hand.

See docs/slurm.md. Everything that Slurm or the config would refuse is refused here, before
anything is queued (exit 2 with Slurm's own message and what to change).
"""

from __future__ import annotations

import argparse
import json


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


def _resources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources (one Slurm task per rank)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--tasks-per-node", type=int, default=1, help="ranks per node")
    g.add_argument("--gpus-per-node", type=int, default=0)
    g.add_argument("--cpus-per-task", type=int, default=1)
    g.add_argument("--mem", default=None, help="memory per node, e.g. 32G")
    g.add_argument("--time", default="1:00:00", help="time limit: MINUTES, HH:MM:SS or D-HH:MM:SS")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="--KEY[=VALUE]",
                   help="any other sbatch option, e.g. --sbatch-arg=--reservation=r1 (repeatable)")
    g.add_argument("--name", default="hpc", help="job name (default: the config's name)")
    g.add_argument("--signal-delay-s", type=int, default=90,
                   help="USR2 this many seconds before the time limit, to checkpoint and requeue (default 90)")
    g.add_argument("--max-requeues", type=int, default=3,
                   help="requeues after hitting the time limit (preemptions are unlimited; default 3)")
    m = p.add_argument_group("where it runs")
    x = m.add_mutually_exclusive_group()
    x.add_argument("--local", dest="mode", action="store_const", const="local",
                   help="submitit's LocalExecutor on this machine (N ranks through mpiexec)")
    x.add_argument("--debug", dest="mode", action="store_const", const="debug",
                   help="submitit's DebugExecutor: in this process, one rank, for pdb")
    p.set_defaults(mode="slurm")
    m.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    m.add_argument("--wait", action="store_true", help="wait for the job(s) and print the result")


def register(sub) -> None:
    p = sub.add_parser("submit", help="submit training, inference, sweeps and pipelines to Slurm")
    ssub = p.add_subparsers(dest="what", metavar="WHAT", parser_class=_Intermixed)
    t = ssub.add_parser("train", help="a training run (hpc train CONFIG) as a Slurm job")
    t.add_argument("config", help="YAML config (or a shipped config name)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.01")
    _resources(t)
    t.set_defaults(func=_train)

    i = ssub.add_parser("infer", help="batch inference (hpc infer) as a Slurm job")
    i.add_argument("--model", required=True, help="NAME@ALIAS or NAME@VERSION")
    i.add_argument("--input", required=True, help="data directory to score")
    i.add_argument("--output", required=True, help="output directory")
    i.add_argument("--infer-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for hpc infer (repeatable), e.g. --infer-arg=--batch-size=512")
    _resources(i)
    i.set_defaults(func=_infer)

    s = ssub.add_parser("sweep", help="a grid of training runs as one job array")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--grid", action="append", default=[], required=True, metavar="KEY=V1,V2",
                   help="a swept config key (repeatable; the grid is their product)")
    s.add_argument("--max-parallel", type=int, default=256, help="members running at once")
    _resources(s)
    s.set_defaults(func=_sweep)

    pl = ssub.add_parser("pipeline", help="train -> register -> infer, chained with afterok")
    pl.add_argument("config", help="training config with registry.name set")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--infer-input", required=True, help="data directory the infer stage scores")
    pl.add_argument("--infer-output", required=True, help="where the infer stage writes")
    pl.add_argument("--alias", default="staging", help="alias the register stage points at the new "
                    "version, and that infer uses (default: registry.alias, else staging)")
    pl.add_argument("--infer-tasks", type=int, default=None, help="ranks of the infer stage (default: as train)")
    _resources(pl)
    pl.set_defaults(func=_pipeline)

    from hpc.cli.ensemble import add_submit_parser

    add_submit_parser(ssub, "ensemble")  # = `hpc ensemble submit` (docs/ensembles.md)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _res(args):
    from hpc.launch.sbatch import SlurmResources

    return SlurmResources(
        nodes=args.nodes, tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, mem=args.mem, time=args.time, partition=args.partition,
        account=args.account, qos=args.qos, constraint=args.constraint, sbatch_args=list(args.sbatch_arg),
        name=args.name, signal_delay_s=args.signal_delay_s, max_requeues=args.max_requeues,
        array_parallelism=getattr(args, "max_parallel", 256)).check()


def _report(sub, args) -> int:
    """Print the jobs, remember them for `hpc logs`, and with --wait (or --debug) their results."""
    from hpc.launch.jobs import record

    if sub.mode == "slurm":
        for stage, job, run_dir in zip(sub.stages, sub.jobs, sub.run_dirs):
            record(str(job.job_id), f"{sub.kind}:{stage}" if sub.kind != stage else sub.kind, run_dir,
                   job.paths.folder)
    print(sub.describe(), flush=True)
    if not (args.wait or sub.mode == "debug"):
        return 0
    rc = 0
    for stage, job in zip(sub.stages, sub.jobs):
        try:
            result = job.results()[0]
        except Exception as e:  # noqa: BLE001 - submitit raises its own errors for failed jobs
            print(f"{stage}: job {job.job_id} failed: {e}", flush=True)
            rc = 1
            continue
        brief = result if not isinstance(result, dict) else {
            k: result[k] for k in ("state", "run_dir", "metrics", "step", "slurm") if k in result}
        print(f"{stage}: job {job.job_id} finished: {json.dumps(brief, default=str)}", flush=True)
    return rc


def _train(args) -> int:
    from hpc.launch.submit import submit_train

    out = submit_train(args.config, args.overrides, _res(args), args.mode, args.dry_run)
    if isinstance(out, str):
        print(out, end="")
        return 0
    return _report(out, args)


def _infer(args) -> int:
    from hpc.launch.submit import submit_infer

    infer_args = ["--model", args.model, "--input", args.input, "--output", args.output, *args.infer_arg]
    out = submit_infer(infer_args, _res(args), args.output, args.mode, args.dry_run)
    if isinstance(out, str):
        print(out, end="")
        return 0
    return _report(out, args)


def _sweep(args) -> int:
    from hpc.launch.submit import submit_sweep

    out = submit_sweep(args.config, args.overrides, args.grid, _res(args), args.mode, args.dry_run)
    if isinstance(out, str):
        print(out, end="")
        return 0
    sub, sweep_dir = out
    print(f"sweep: {len(sub.jobs)} members; summary: hpc sweep show {sweep_dir}")
    rc = _report(sub, args)
    if args.wait:
        from hpc.cli.sweep import show

        show(sweep_dir)
    return rc


def _pipeline(args) -> int:
    from hpc.launch.submit import submit_pipeline

    if args.mode != "slurm":
        raise ValueError("hpc submit pipeline chains Slurm jobs (afterok): --local/--debug are not supported; "
                         "run hpc train, hpc registry add and hpc infer in turn instead")
    out = submit_pipeline(args.config, args.overrides, _res(args), args.infer_input, args.infer_output,
                          args.alias, args.infer_tasks, args.dry_run)
    if isinstance(out, str):
        print(out, end="")
        return 0
    print("pipeline: " + " -> ".join(f"{s} {j.job_id}" for s, j in zip(out.stages, out.jobs))
          + " (a failed stage cancels the rest)")
    return _report(out, args)
