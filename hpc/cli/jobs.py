"""`hpc jobs [--all]`, `hpc logs JOB [--rank R] [--follow]`, `hpc cancel JOB` (docs/slurm.md)."""

from __future__ import annotations

from hpc.util.table import format_table


def register(sub) -> None:
    j = sub.add_parser("jobs", help="your Slurm jobs (squeue), with the run directory of hpc-submitted ones")
    j.add_argument("--all", action="store_true", help="also finished jobs Slurm still remembers")
    j.set_defaults(func=_jobs)

    lg = sub.add_parser("logs", help="a job's stdout/stderr for one rank (submitit's log folder)")
    lg.add_argument("job", help="job id, or ARRAYJOB_INDEX for an array member")
    lg.add_argument("--rank", type=int, default=0, help="Slurm task (rank) whose logs to show (default 0)")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    lg.add_argument("--stream", choices=("both", "out", "err"), default="both")
    lg.set_defaults(func=_logs)

    c = sub.add_parser("cancel", help="cancel a job (scancel)")
    c.add_argument("job")
    c.set_defaults(func=_cancel)


def _jobs(args) -> int:
    from hpc.launch.jobs import list_jobs

    headers, rows = list_jobs(args.all)
    if not rows:
        print("no jobs" + ("" if args.all else " (pending or running; --all shows finished ones too)"))
        return 0
    print(format_table(headers, rows))
    return 0


def _logs(args) -> int:
    from hpc.launch.jobs import show_logs

    return show_logs(args.job, args.rank, args.follow, stream=args.stream)


def _cancel(args) -> int:
    from hpc.launch.jobs import cancel

    message = cancel(args.job)
    print(message)
    return 0 if "CANCELLED by Slurm" in message or "still" in message else 1
