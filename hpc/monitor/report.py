"""`hpc report RUN_DIR|SWEEP_DIR|INFER_OUT [--out DIR]`: report.html + PNG plots (matplotlib, Agg).

One page per call. A run directory gets: loss (log axis) and metric curves (train and val), the
learning rate and gradient norm, throughput over time, the per-rank step-time distribution, data
wait vs comm vs compute per rank, checkpoint durations, and where the allocated time went
(start-up stated apart; goodput; time lost to requeues). A directory of runs (a sweep, an
ensemble's members) gets a comparison table and plot, then each run's section. A batch-inference
output directory gets rows over time and rows/s per rank, both from one definition.
Plots without data are left out with a line saying why, never drawn empty.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path
from typing import Callable

from hpc.instrument.heartbeat import PHASES, hist_edges
from hpc.monitor import rundata as R
from hpc.util.io import atomic_write_text, read_json

COLORS = {"data": "#4c78a8", "compute": "#54a24b", "comm": "#e45756", "checkpoint": "#b279a2",
          "eval": "#f58518", "idle": "#bab0ac", "redone": "#9d755d", "productive": "#54a24b",
          "startup": "#72b7b2"}
LOG_AXIS = ("loss", "rmse")   # errors shrink by decades: on a linear axis everything late is flat
CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
img{max-width:100%;display:block;margin:1em 0}.note{color:#666;font-style:italic}"""


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # headless: no display on compute nodes
    import matplotlib.pyplot as plt
    return plt


class Page:
    """Accumulates HTML and writes figures next to it (one PNG per plot)."""

    def __init__(self, out: Path, title: str):
        self.out, self.parts, self.images = out, [], []
        self.parts.append(f"<h1>{html.escape(title)}</h1><p class=note>generated "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')} by hpc report</p>")

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def h3(self, text: str) -> None:
        self.parts.append(f"<h3>{html.escape(text)}</h3>")

    def p(self, text: str, note: bool = False) -> None:
        self.parts.append(f"<p{' class=note' if note else ''}>{html.escape(text)}</p>")

    def table(self, headers: list[str], rows: list[list]) -> None:
        def cell(v, tag):
            cls = " class=l" if isinstance(v, str) else ""
            if isinstance(v, float):
                v = f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
            return f"<{tag}{cls}>{html.escape('-' if v is None else str(v))}</{tag}>"
        head = "".join(cell(h, "th") for h in headers)
        body = "".join("<tr>" + "".join(cell(v, "td") for v in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def figure(self, name: str, alt: str, draw: Callable, size=(9, 4)) -> None:
        plt = _plt()
        fig = plt.figure(figsize=size, dpi=90)
        try:
            draw(fig)
            fig.tight_layout()
            fig.savefig(self.out / name)
        finally:
            plt.close(fig)
        self.images.append(name)
        self.parts.append(f'<img src="{html.escape(name)}" alt="{html.escape(alt)}">')

    def write(self) -> Path:
        doc = (f"<!doctype html><html><head><meta charset=utf-8><title>hpc report</title><style>{CSS}</style>"
               f"</head><body>{''.join(self.parts)}</body></html>\n")
        path = self.out / "report.html"
        atomic_write_text(path, doc)
        return path


# -- run sections --------------------------------------------------------------------------------

def run_section(page: Page, rd: R.RunData, prefix: str) -> None:
    s = rd.summary
    page.h2(f"run {rd.name}")
    sps, src = R.run_samples_per_s(s, R.last_of_kind(rd.metrics, "train"), rd.heartbeats)
    g = R.goodput(rd.heartbeats)
    facts = [["directory", str(rd.path)], ["state", s.get("state", "(no summary.json: running or killed)")],
             ["model", (s.get("model") or {}).get("family")], ["world size", s.get("world_size")],
             ["backend", s.get("backend")], ["steps", f"{s.get('step')} / {s.get('total_steps')}"],
             ["samples/s", sps], ["samples/s from", src or "-"], ["wall s", s.get("wall_s")],
             ["start-up s", g.get("startup_s")],
             ["goodput %", None if g.get("goodput") is None else 100 * g["goodput"]]]
    for split in ("val", "test"):
        for k, v in ((s.get("metrics") or {}).get(split) or {}).items():
            facts.append([f"{split} {k}", v])
    page.table(["", "value"], [[a, b] for a, b in facts])
    page.p(SAMPLES_PER_S, note=True)
    _curves(page, rd, prefix)
    _optimizer(page, rd, prefix)
    _throughput(page, rd, prefix, sps)
    _step_times(page, rd, prefix)
    _phases(page, rd, prefix)
    _checkpoints(page, rd, prefix)
    _goodput(page, rd, prefix)


def _curves(page: Page, rd: R.RunData, prefix: str) -> None:
    page.h3("Loss and metrics")
    train, val = R.curves(rd.metrics, "train"), R.curves(rd.metrics, "val")
    names = [k for k in ("loss", "accuracy", "rmse", "auc", "top5") if k in train or k in val]
    if not names:
        page.p("no train/val records in metrics.jsonl: no loss curves", note=True)
        return

    def draw(fig):
        for i, k in enumerate(names):
            ax = fig.add_subplot(1, len(names), i + 1)
            for label, c, style in (("train", train, "-"), ("val", val, "o-")):
                if k in c:
                    ax.plot(*c[k], style, label=label, markersize=4)
            ax.set_xlabel("step")
            _log_if_positive(ax, k in LOG_AXIS, [c[k][1] for c in (train, val) if k in c])
            ax.set_title(k + (" (log scale)" if ax.get_yscale() == "log" else ""))
            ax.legend()
    logs = [k for k in names if k in LOG_AXIS]
    page.figure(f"{prefix}curves.png", "loss and metric curves, train and val"
                + (f" ({', '.join(logs)} on a log axis)" if logs else ""), draw, size=(4.5 * len(names), 3.6))


def _log_if_positive(ax, want: bool, values: list[list[float]]) -> None:
    """A log y axis when asked and every value is positive (a log axis cannot show 0 or less)."""
    vals = [v for vs in values for v in vs if v == v]
    if want and vals and min(vals) > 0:
        ax.set_yscale("log")


def _optimizer(page: Page, rd: R.RunData, prefix: str) -> None:
    page.h3("Learning rate and gradient norm")
    train = R.curves(rd.metrics, "train")
    panels = [(k, t) for k, t in (("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)"))
              if k in train]
    if not panels:
        page.p("no lr or grad_norm in the train records of metrics.jsonl", note=True)
        return

    def draw(fig):
        for i, (k, title) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            steps, vals = train[k]
            ax.plot(steps, vals, "-", color="#4c78a8")
            ax.set_xlabel("step")
            # grad norm spikes span decades; lr schedules (warm-up, decay) read best on a log axis
            # once they cover more than two decades, else linear shows the shape.
            pos = [v for v in vals if v > 0]
            _log_if_positive(ax, k == "grad_norm" or (len(pos) == len(vals) and max(pos) > 100 * min(pos)), [vals])
            ax.set_title(title + (" (log scale)" if ax.get_yscale() == "log" else ""))
    page.figure(f"{prefix}optimizer.png", "learning rate and gradient norm per step", draw,
                size=(4.5 * len(panels), 3.4))


SAMPLES_PER_S = ("samples/s = global samples in completed optimizer steps / seconds spent in those steps "
                 "(data wait + compute + gradient sync; evaluation, checkpointing and start-up excluded); "
                 "the same figure in the training log, metrics.jsonl, summary.json and hpc status.")


def _throughput(page: Page, rd: R.RunData, prefix: str, run_sps: float | None) -> None:
    page.h3("Throughput over time")
    xm, ym = R.throughput_from_metrics(rd.metrics)
    # Heartbeat series are seconds since their process started: shift them to epoch time.
    rank_series = {}
    for r, hb in sorted(rd.heartbeats.items()):
        x, y = R.series_rate(hb.get("series") or [])
        if x:
            rank_series[r] = ([float(hb.get("started", 0)) + t for t in x], y)
    if not xm and not rank_series:
        page.p("no throughput data (no train records with time, no heartbeat series)", note=True)
        return
    t0 = min(xm[:1] + [s[0][0] for s in rank_series.values()])
    first = min([r["time"] for r in rd.metrics if r.get("time")] or [t0])
    t0 = min(t0, first)

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        if xm:
            ax.plot([(x - t0) / 60 for x in xm], ym, "-", color="black",
                    label="all ranks (metrics.jsonl: since the attempt began)")
        if run_sps is not None:
            ax.axhline(run_sps, color="black", linestyle=":", label=f"the run: {run_sps:,.1f}")
        for r, (x, y) in rank_series.items():
            ax.plot([(t - t0) / 60 for t in x], y, "-", alpha=0.6,
                    label=f"rank {r}'s share (heartbeat, per interval, last attempt)")
        ax.set_xlabel("minutes since the run's first record")
        ax.set_ylabel("samples/s (step time only)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    page.figure(f"{prefix}throughput.png", "throughput over time (samples/s of step time)", draw)


def _step_times(page: Page, rd: R.RunData, prefix: str) -> None:
    page.h3("Step-time distribution per rank")
    hists = {r: (hb.get("step_hist") or {}).get("counts") or [] for r, hb in sorted(rd.heartbeats.items())}
    hists = {r: c for r, c in hists.items() if sum(c)}
    if not hists:
        page.p("no step-time histogram (no heartbeats)", note=True)
        return
    edges = hist_edges()
    used = [i for c in hists.values() for i, n in enumerate(c) if n]
    lo, hi = max(0, min(used) - 1), min(len(edges) - 1, max(used) + 1)

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for r, c in hists.items():
            total = sum(c)
            ax.step(edges[lo:hi + 1], [n / total for n in c[lo:hi + 1]], where="pre", label=f"rank {r}")
        ax.set_xscale("log")
        ax.set_xlabel("step time (s, bucket upper edge)")
        ax.set_ylabel("fraction of steps")
        ax.legend(fontsize=8)
    page.figure(f"{prefix}step_times.png", "per-rank step-time distribution", draw)
    rows = []
    for r, hb in sorted(rd.heartbeats.items()):
        q = R.step_quantiles(hb)
        rows.append([r, q["steps"], q["p50"], q["p90"], q["p99"]])
    page.table(["rank", "steps", "p50 s", "p90 s", "p99 s"], rows)


def _phases(page: Page, rd: R.RunData, prefix: str) -> None:
    page.h3("Data wait vs comm vs compute")
    tot = {r: R.phase_totals(hb) for r, hb in sorted(rd.heartbeats.items())}
    shown = ("startup",) + PHASES
    names = {"startup": "start-up"}
    if not tot:
        frac = rd.summary.get("time_fractions")
        page.p(f"no heartbeats; the trainer's own split: {frac}" if frac else "no phase times", note=True)
        return

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        ranks = list(tot)
        left = [0.0] * len(ranks)
        for ph in shown:
            vals = [tot[r].get(ph, 0.0) for r in ranks]
            ax.barh([f"rank {r}" for r in ranks], vals, left=left, color=COLORS[ph], label=names.get(ph, ph))
            left = [a + b for a, b in zip(left, vals)]
        ax.set_xlabel("seconds (all attempts)")
        ax.legend(ncol=7, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    page.figure(f"{prefix}phases.png", "data wait vs comm vs compute per rank", draw,
                size=(9, 1.2 + 0.45 * len(tot)))
    rows = []
    for r, acc in tot.items():
        busy = sum(acc.values()) or 1.0
        rows.append([r] + [100 * acc.get(ph, 0) / busy for ph in shown])
    page.table(["rank"] + [f"{names.get(ph, ph)} %" for ph in shown], rows)


def _checkpoints(page: Page, rd: R.RunData, prefix: str) -> None:
    page.h3("Checkpoint durations")
    hb = rd.heartbeats.get(0) or next(iter(rd.heartbeats.values()), {})
    ev = [e for e in hb.get("events") or [] if e[0] == "checkpoint"]
    if not ev:
        page.p("no checkpoint durations recorded (no heartbeat checkpoint phases)", note=True)
        return

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        ax.bar(range(len(ev)), [e[2] for e in ev], color=COLORS["checkpoint"])
        ax.set_xticks(range(len(ev)), [str(e[3]) for e in ev], rotation=60, fontsize=7)
        ax.set_xlabel("step at the checkpoint (rank 0)")
        ax.set_ylabel("seconds")
    page.figure(f"{prefix}checkpoints.png", "checkpoint durations", draw)
    durs = [e[2] for e in ev]
    page.p(f"{len(ev)} checkpoints, mean {sum(durs) / len(durs):.2f} s, max {max(durs):.2f} s")


def _goodput(page: Page, rd: R.RunData, prefix: str) -> None:
    page.h3("Goodput and time lost to requeues")
    g = R.goodput(rd.heartbeats)
    if not g["attempts"]:
        page.p("no attempts recorded (no heartbeats): goodput unknown", note=True)
        return
    parts = ("startup", "productive", "redone", "checkpoint", "eval", "idle")
    names = {"startup": "start-up", "idle": "idle (waits outside steps)"}

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        labels = [f"attempt {a['attempt']} (steps {a['first_step']}-{a['last_step']})" for a in g["attempts"]]
        left = [0.0] * len(labels)
        for k in parts:
            vals = [a[f"{k}_s"] for a in g["attempts"]]
            ax.barh(labels, vals, left=left, color=COLORS[k], label=names.get(k, k))
            left = [x + y for x, y in zip(left, vals)]
        ax.set_xlabel("allocated seconds (mean over ranks)")
        ax.set_title(f"goodput {100 * (g['goodput'] or 0):.1f}%: productive step time / "
                     "(allocated time - first start-up)", pad=22)
        ax.legend(ncol=6, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    page.figure(f"{prefix}goodput.png", "start-up, time lost to requeues, and goodput", draw,
                size=(9, 1.6 + 0.5 * len(g["attempts"])))
    page.p(f"start-up {g['startup_s']:.1f} s (process start to the first step: imports, data, model, "
           f"checkpoint load), not counted against goodput; goodput {100 * (g['goodput'] or 0):.1f}% of the "
           f"{g['allocated_s'] - g['startup_s']:.0f} s after it ({g['allocated_s']:.0f} allocated s); "
           f"{g['requeues']} requeue(s) lost {g['lost_to_requeues_s']:.0f} s (redone steps + "
           f"{g['restart_s']:.0f} s restarting); {g['queue_s']:.0f} s waiting in the queue between attempts "
           "(not allocated)")
    page.table(["attempt", "restart", "steps", "allocated s", "start-up s", "productive s", "redone s",
                "checkpoint s", "eval s", "idle s"],
               [[a["attempt"], a["restart_count"], f"{a['first_step']}-{a['last_step']}", a["allocated_s"],
                 a["startup_s"], a["productive_s"], a["redone_s"], a["checkpoint_s"], a["eval_s"], a["idle_s"]]
                for a in g["attempts"]])


# -- sweeps and inference ------------------------------------------------------------------------

def sweep_section(page: Page, runs: list[R.RunData], params: list[dict]) -> None:
    page.h2(f"comparison of {len(runs)} runs")
    pkeys = sorted({k for p in params for k in p})
    metric_keys = sorted({k for rd in runs for k in ((rd.summary.get("metrics") or {}).get("val") or {})
                          if k != "samples"})
    rows = []
    for rd, par in zip(runs, params):
        val = (rd.summary.get("metrics") or {}).get("val") or {}
        g = R.goodput(rd.heartbeats)
        sps = R.run_samples_per_s(rd.summary, R.last_of_kind(rd.metrics, "train"), rd.heartbeats)[0]
        rows.append([rd.name, rd.summary.get("state", "-"), (rd.summary.get("model") or {}).get("family"),
                     rd.summary.get("step")] + [str(par.get(k, "")) for k in pkeys] + [val.get(k) for k in metric_keys] +
                    [sps, rd.summary.get("wall_s"),
                     None if g.get("goodput") is None else 100 * g["goodput"]])
    page.table(["run", "state", "model", "steps"] + pkeys + [f"val {k}" for k in metric_keys] +
               ["samples/s", "wall s", "goodput %"], rows)
    withval = [rd for rd in runs if "loss" in R.curves(rd.metrics, "val")]
    if not withval:
        page.p("no val curves to compare", note=True)
        return

    def draw(fig):
        ax = fig.add_subplot(1, 2, 1)
        for rd in withval:
            ax.plot(*R.curves(rd.metrics, "val")["loss"], "o-", markersize=3, label=rd.name)
        ax.set_xlabel("step")
        ax.set_title("val loss")
        ax.legend(fontsize=7)
        ax2 = fig.add_subplot(1, 2, 2)
        names = [rd.name for rd in withval]
        ax2.barh(names, [min(R.curves(rd.metrics, "val")["loss"][1]) for rd in withval], color="#4c78a8")
        ax2.set_title("best val loss")
    page.figure("sweep.png", "sweep comparison", draw, size=(11, 1.5 + 0.4 * max(4, len(withval))))


def infer_section(page: Page, out: Path) -> None:
    info = R.infer_progress(out)
    man = info["manifest"]
    page.h2(f"batch scoring {out}")
    model = man.get("model") or {}
    page.table(["", "value"], [["model", f"{model.get('name')}@{model.get('version')}"], ["rows", info["rows"]],
                               ["partitions", len(info["parts"])], ["format", man.get("format")],
                               ["ranks", man.get("world_size")], ["scoring s", man.get("scoring_s")],
                               ["finished", "yes (_SUCCESS)" if (out / "_SUCCESS").exists() else "no"]])
    ranks, total = info["ranks"], info["all_ranks"]
    if ranks:
        page.p(ROWS_PER_S, note=True)
        page.table(["rank", "rows", "scoring s", "rows/s", "written", "skipped"],
                   [[r["rank"], r["rows"], r["scoring_s"], r["rows_per_s"], r["written"], r["skipped"]]
                    for r in ranks]
                   + [["all ranks", total["rows"], total["scoring_s"], total["rows_per_s"],
                       sum(r["written"] or 0 for r in ranks), sum(r["skipped"] or 0 for r in ranks)]])
    xs, cum = info["series"]
    if len(xs) < 2:
        page.p("no finished partitions of this run: no rows-over-time plot", note=True)
        return
    bars = [(f"rank {r['rank']}", r["rows_per_s"]) for r in ranks if r["rows_per_s"] is not None]
    if total["rows_per_s"] is not None:
        bars.append(("all ranks", total["rows_per_s"]))

    def draw(fig):
        ax = fig.add_subplot(1, 2 if bars else 1, 1)
        ax.plot(xs, cum, "o-", markersize=3, label="rows written (partitions finished)")
        if total["rows_per_s"] is not None:
            ax.plot([0, xs[-1]], [0, total["rows_per_s"] * xs[-1]], ":", color="black",
                    label=f"all ranks: {total['rows_per_s']:,.0f} rows/s")
        ax.set_xlabel("seconds since scoring started (estimated)" if info["from_scoring_start"]
                      else "seconds since the first partition finished (no _MANIFEST.json yet)")
        ax.set_ylabel("rows written")
        ax.legend(fontsize=8)
        if bars:
            ax2 = fig.add_subplot(1, 2, 2)
            ax2.barh([b[0] for b in bars], [b[1] for b in bars], color="#4c78a8")
            ax2.set_xlabel("rows/s (rows written / scoring s)")
            ax2.set_title("rows/s, as in the table")
    page.figure("infer_rows.png", "batch scoring: rows over time and rows/s per rank", draw)
    if not bars:
        page.p("the job has not finished (no _MANIFEST.json): rows/s per rank appear when it does", note=True)


ROWS_PER_S = ("rows/s = rows written / scoring seconds: a rank's time from its first batch read to its last "
              "partition written (model loading excluded); all ranks = every rank's rows over the slowest "
              "rank's seconds. The plot below uses the same figures.")


def make_report(target: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, list[str]]:
    """Write report.html (+ PNGs) for a run, a directory of runs, or an inference output dir."""
    target = Path(target)
    if not target.is_dir():
        raise ValueError(f"{target}: no such directory (pass a run dir, a sweep dir or an inference output dir)")
    out_dir = Path(out) if out else target / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    if R.is_infer_dir(target):
        page = Page(out_dir, f"hpc report: batch scoring {target.name}")
        infer_section(page, target)
        return page.write(), page.images
    params: dict[Path, dict] = {}
    if (target / "sweep.json").is_file():  # `hpc submit sweep`: members' run dirs live elsewhere
        members = read_json(target / "sweep.json").get("members") or []
        runs = [Path(m["run_dir"]) for m in members if m.get("run_dir") and R.is_run_dir(Path(m["run_dir"]))]
        params = {Path(m["run_dir"]): m.get("params") or {} for m in members if m.get("run_dir")}
        if not runs:
            raise ValueError(f"{target}: none of the {len(members)} sweep members has a run directory yet")
    else:
        runs = R.find_runs(target)
    if not runs:
        raise ValueError(f"{target}: no run directories here or below (a run has summary.json, metrics.jsonl "
                         "or heartbeat/), and it is not an inference output (_MANIFEST.json)")
    data = [R.load_run(p) for p in runs]
    page = Page(out_dir, f"hpc report: {target.name}" + (f" ({len(runs)} runs)" if len(runs) > 1 else ""))
    if len(data) > 1 or params:
        sweep_section(page, data, [params.get(p, {}) for p in runs])
    for i, rd in enumerate(data):
        run_section(page, rd, prefix=f"run{i}_" if len(data) > 1 else "")
    return page.write(), page.images
