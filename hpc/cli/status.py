"""`hpc status RUN_DIR|JOB_ID`: step, ETA, per-rank throughput and heartbeats, time split, checkpoint age."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("status", help="where a run is: step, ETA, ranks' heartbeats, time split, state")
    p.add_argument("target", metavar="RUN_DIR|JOB_ID",
                   help="a run directory (runs/<name>/<id>) or a Slurm job id (searched under --runs-root "
                        "and the job's working directory)")
    p.add_argument("--runs-root", action="append", default=None, metavar="DIR",
                   help="where to look for the run of a JOB_ID (repeatable; default ./runs)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                   help="refresh every SECONDS until the run reaches a final state (Ctrl-C stops)")
    p.set_defaults(func=run)


def resolve_target(target: str, roots: list[str] | None) -> Path:
    from hpc.monitor.status import find_run_for_job

    p = Path(target)
    if p.is_dir():
        return p
    if re.fullmatch(r"\d+(_\d+)?", target):
        return find_run_for_job(target, [Path(r) for r in (roots or ["runs"])])
    raise ValueError(f"{target}: neither a run directory nor a Slurm job id (digits, or JOBID_TASK)")


def run(args) -> int:
    from hpc.monitor.status import FINAL_STATES, collect_status, format_status

    if args.watch is not None and args.watch <= 0:
        raise ValueError(f"--watch {args.watch}: must be a positive number of seconds")
    run_dir = resolve_target(args.target, args.runs_root)
    while True:
        st = collect_status(run_dir)
        if args.json:
            print(json.dumps(st, indent=2, sort_keys=True, default=str))
        else:
            print(format_status(st))
        if args.watch is None or st["state"] in FINAL_STATES:
            return 0
        time.sleep(args.watch)
        print()
