"""`hpc status RUN_DIR|JOB_ID|CONFIG`: state, step, loss, ETA, samples/s, ranks' heartbeats, final metrics."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

WATCH_DEFAULT_S = 10.0


class NoRunYet(ValueError):
    """A config whose <out_dir>/<name>/ has no run yet: `--watch` waits for one."""


def register(sub) -> None:
    p = sub.add_parser("status", help="where a run is: state, step, loss, ETA, samples/s, ranks' heartbeats, "
                                      "final metrics")
    p.add_argument("target", metavar="RUN_DIR|JOB_ID|CONFIG",
                   help="a run directory (runs/<name>/<id>), a directory of runs (runs/<name>: its newest), "
                        "a Slurm job id (searched under --runs-root and the job's working directory), or a "
                        "training config (a path or a shipped config's name: its newest run under "
                        "<out_dir>/<name>)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="with a CONFIG: the overrides given to `hpc train` that move the run (out_dir=, name=)")
    p.add_argument("--runs-root", action="append", default=None, metavar="DIR",
                   help="where to look for the run of a JOB_ID (repeatable; default ./runs)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--watch", type=float, nargs="?", const=WATCH_DEFAULT_S, default=None, metavar="SECONDS",
                   help=f"refresh every SECONDS (default {WATCH_DEFAULT_S:g}) until the run reaches a final "
                        "state (Ctrl-C stops)")
    p.set_defaults(func=run)


def _is_run_dir(p: Path) -> bool:
    from hpc.monitor.rundata import RUN_MARKERS
    from hpc.monitor.status import FIRST_FILES

    return any((p / m).exists() for m in RUN_MARKERS + FIRST_FILES)


def resolve_target(target: str, roots: list[str] | None, overrides: list[str] | None = None) -> Path:
    """The run directory a target names (ValueError saying what was tried when none)."""
    from hpc.monitor.status import find_run_for_job, newest_run, runs_of_config

    p = Path(target)
    if overrides and (p.is_dir() or re.fullmatch(r"\d+(_\d+)?", target)):
        raise ValueError(f"{' '.join(overrides)}: key=value overrides go with a CONFIG target only "
                         f"(to find its runs), not with a run directory or a job id")
    if p.is_dir():
        if not _is_run_dir(p) and newest_run(p) is not None:  # runs/<name>: its newest run
            return newest_run(p)
        return p
    if re.fullmatch(r"\d+(_\d+)?", target):
        return find_run_for_job(target, [Path(r) for r in (roots or ["runs"])])
    try:
        base = runs_of_config(target, overrides or [])
    except ValueError as e:
        raise ValueError(f"{target}: no such run directory, not a Slurm job id (digits, or JOBID_TASK), and "
                         f"not a config ({e}). A run's directory appears a few seconds after `hpc train` "
                         "starts; `hpc status CONFIG --watch` waits for it") from None
    newest = newest_run(base)
    if newest is None:
        raise NoRunYet(f"config {target}: no run under {base} yet (`hpc train` creates "
                         f"{base}/<run_id>/ once it has started); pass the out_dir=/name= overrides the run "
                         "was started with, or --watch to wait for it")
    return newest


def run(args) -> int:
    from hpc.monitor.status import FINAL_STATES, collect_status, format_status

    if args.watch is not None and args.watch <= 0:
        raise ValueError(f"--watch {args.watch}: must be a positive number of seconds")
    run_dir = _wait_for_target(args) if args.watch is not None else \
        resolve_target(args.target, args.runs_root, args.overrides)
    clear = args.watch is not None and not args.json and sys.stdout.isatty()
    while True:
        st = collect_status(run_dir)
        if clear:  # a terminal: redraw in place instead of scrolling one screen per refresh
            print("\033[H\033[J", end="")
        if args.json:
            print(json.dumps(st, indent=2, sort_keys=True, default=str))
        else:
            print(format_status(st))
        sys.stdout.flush()
        if args.watch is None or st["state"] in FINAL_STATES:
            return 0
        time.sleep(args.watch)
        if not clear:
            print()


def _wait_for_target(args) -> Path:
    """With --watch, a config whose run does not exist yet is waited for (the first seconds of a run)."""
    announced = False
    while True:
        try:
            return resolve_target(args.target, args.runs_root, args.overrides)
        except NoRunYet as e:
            if not announced:
                print(f"waiting for a run: {e}", file=sys.stderr)
                announced = True
            time.sleep(args.watch)
