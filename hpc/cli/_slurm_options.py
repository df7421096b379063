"""The Slurm options and the submission report that `hpc submit ...` and `hpc ensemble submit` share.

Not a subcommand (the name starts with ``_``, so ``build_parser`` skips it).
"""

from __future__ import annotations

import argparse
import json


def add_resource_options(p: argparse.ArgumentParser) -> None:
    """The resources, where it runs, --dry-run and --wait (one Slurm task per rank)."""
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


def resources_from_args(args):
    """The checked ``SlurmResources`` of the options above."""
    from hpc.launch.sbatch import SlurmResources

    return SlurmResources(
        nodes=args.nodes, tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, mem=args.mem, time=args.time, partition=args.partition,
        account=args.account, qos=args.qos, constraint=args.constraint, sbatch_args=list(args.sbatch_arg),
        name=args.name, signal_delay_s=args.signal_delay_s, max_requeues=args.max_requeues,
        array_parallelism=getattr(args, "max_parallel", 256)).check()


def report_submitted(sub, args) -> int:
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


def print_or_report(out, args) -> int:
    """A ``--dry-run`` script is printed as it is; submitted jobs are reported."""
    if isinstance(out, str):
        print(out, end="")
        return 0
    return report_submitted(out, args)
