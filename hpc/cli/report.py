"""`hpc report RUN_DIR|SWEEP_DIR|INFER_OUT [--out DIR]`: report.html with PNG plots (needs matplotlib)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="report.html + plots: loss (log axis), lr and grad norm, throughput, "
                                      "step times, time split, checkpoints, start-up and goodput; sweep "
                                      "comparison; batch-scoring rows/s")
    p.add_argument("target", metavar="RUN_DIR|SWEEP_DIR|INFER_OUT",
                   help="a run directory, a directory of runs (sweep/ensemble), or a batch-inference output")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write (default: TARGET/report)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("hpc report needs matplotlib: pip install -e .[report]") from None
    from hpc.monitor.report import make_report

    path, images = make_report(args.target, args.out)
    print(f"wrote {path} ({len(images)} plots)")
    return 0
