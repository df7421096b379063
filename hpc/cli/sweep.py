"""`hpc sweep show SWEEP_DIR|ARRAY_JOB_ID`: a sweep's config values -> final metrics (docs/slurm.md)."""

from __future__ import annotations

from pathlib import Path

from hpc.util.table import format_table


def register(sub) -> None:
    p = sub.add_parser("sweep", help="sweeps submitted with `hpc submit sweep`")
    ssub = p.add_subparsers(dest="what", metavar="WHAT")
    s = ssub.add_parser("show", help="a table of swept values and final metrics (writes summary.json)")
    s.add_argument("sweep", help="sweep directory (runs/<name>/sweep-<id>) or the array job id")
    s.add_argument("--runs-root", action="append", default=None, metavar="DIR",
                   help="where to look for an array job id's sweep (default ./runs)")
    s.set_defaults(func=lambda args: show(args.sweep, args.runs_root))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def show(target: str | Path, roots: list[str] | None = None) -> int:
    from hpc.launch.sweep import find_sweep, summarize, table

    sweep_dir = find_sweep(str(target), roots or ["runs"])
    result = summarize(sweep_dir)
    headers, rows = table(result)
    print(f"sweep {sweep_dir}: {result['finished']}/{result['total']} members completed")
    print(format_table(headers, rows))
    print(f"wrote {sweep_dir / 'summary.json'}")
    return 0
