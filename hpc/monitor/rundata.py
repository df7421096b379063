"""What `hpc report` reads from a run, sweep or inference output directory, and the pure math on it.

Run directory: ``metrics.jsonl`` (rank 0: ``kind`` train|val|test|nonfinite, ``step``, ``epoch``,
``time``, metrics), ``summary.json``, ``config.yaml``, ``heartbeat/rank-R.json`` (phases, step-time
histogram, checkpoint/eval durations, throughput series, one entry per attempt), ``checkpoints/``.
Inference output: ``_MANIFEST.json`` (per-rank rows and scoring seconds) and ``_parts/*.json``
(one per finished partition; its mtime is when it finished).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc.instrument.heartbeat import PHASES, STEP_PHASES, hist_quantile, read_heartbeats
from hpc.util.io import read_json

RUN_MARKERS = ("summary.json", "metrics.jsonl", "heartbeat")
INFER_MARKER = "_MANIFEST.json"


@dataclass
class RunData:
    path: Path
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    heartbeats: dict[int, dict] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.parent.name + "/" + self.path.name  # runs/<name>/<id>: unique within a sweep


def is_run_dir(p: Path) -> bool:
    return p.is_dir() and any((p / m).exists() for m in RUN_MARKERS)


def is_infer_dir(p: Path) -> bool:
    return (p / INFER_MARKER).is_file() or (p / "_parts").is_dir()


def find_runs(root: Path, depth: int = 3) -> list[Path]:
    """Run directories at or below ``root`` (a sweep: runs/<name>/<id>, or any nesting up to ``depth``)."""
    if is_run_dir(root):
        return [root]
    out: list[Path] = []
    if depth > 0 and root.is_dir():
        for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            out += find_runs(child, depth - 1)
    return out


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records; a torn last line (a crash mid-append) is skipped."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def load_run(path: str | os.PathLike) -> RunData:
    p = Path(path)
    if not is_run_dir(p):
        raise ValueError(f"{p}: not a run directory (none of {', '.join(RUN_MARKERS)})")
    rd = RunData(p, metrics=read_metrics(p / "metrics.jsonl"), heartbeats=read_heartbeats(p))
    if (p / "summary.json").is_file():
        try:
            rd.summary = read_json(p / "summary.json")
        except ValueError:
            pass
    if (p / "config.yaml").is_file():
        try:
            import yaml
            rd.config = yaml.safe_load((p / "config.yaml").read_text()) or {}
        except Exception:  # noqa: BLE001 - a report without the config is still a report
            rd.config = {}
    return rd


def curves(metrics: list[dict], kind: str) -> dict[str, tuple[list[float], list[float]]]:
    """{metric: (steps, values)} for records of ``kind``; a requeued run's redone steps keep the last
    value written for each step (the trainer truncates on resume; older files may repeat steps)."""
    by: dict[str, dict[float, float]] = {}
    for r in metrics:
        if r.get("kind") != kind or r.get("step") is None:
            continue
        for k, v in r.items():
            if k in ("kind", "step", "epoch", "time", "samples") or not isinstance(v, (int, float)):
                continue
            if isinstance(v, bool) or v != v:  # NaN (e.g. AUC without both classes)
                continue
            by.setdefault(k, {})[r["step"]] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by.items()}


def last_of_kind(metrics: list[dict], kind: str) -> dict | None:
    """The last metrics.jsonl record of ``kind`` (train, val, test), or None (pure)."""
    return next((r for r in reversed(metrics) if r.get("kind") == kind), None)


def run_samples_per_s(summary: dict | None, last_train: dict | None,
                      heartbeats: dict[int, dict]) -> tuple[float | None, str | None]:
    """The run's samples/s and where it came from (pure); what `hpc status`, `hpc report` and the
    trainer's log all show. One definition (docs/operability.md, ``hpc.train.metrics.samples_per_s``):
    global samples in completed optimizer steps / seconds spent in those steps. The trainer writes
    it to summary.json at the end and to every metrics.jsonl train record; heartbeats carry each
    rank's share, summed here only for a trainer that writes neither.
    """
    if (summary or {}).get("samples_per_s") is not None:
        return float(summary["samples_per_s"]), "summary.json"
    if (last_train or {}).get("samples_per_s") is not None:
        return float(last_train["samples_per_s"]), f"metrics.jsonl, step {last_train.get('step')}"
    rates = [float(hb["samples_per_s"]) for hb in heartbeats.values() if hb.get("samples_per_s") is not None]
    if rates:
        return sum(rates), f"heartbeats, sum of {len(rates)} rank(s)"
    return None, None


def throughput_from_metrics(metrics: list[dict]) -> tuple[list[float], list[float]]:
    """(epoch time, samples/s) of the train records: the trainer's own figure, the definition of
    ``run_samples_per_s`` (pure). A requeue (the step goes back, or a gap over 5x the median)
    becomes a NaN point, which breaks the plotted line instead of bridging the attempts.
    """
    recs = [r for r in metrics if r.get("kind") == "train" and r.get("time") is not None and
            r.get("step") is not None and r.get("samples_per_s") is not None]
    xs, ys = [], []
    dts = sorted(b["time"] - a["time"] for a, b in zip(recs, recs[1:]))
    gap = 5 * dts[len(dts) // 2] if dts else 0.0
    for i, r in enumerate(recs):
        if i and (r["step"] <= recs[i - 1]["step"] or (gap > 0 and r["time"] - recs[i - 1]["time"] > gap)):
            xs.append(r["time"])
            ys.append(float("nan"))
        xs.append(r["time"])
        ys.append(float(r["samples_per_s"]))
    return xs, ys


def series_rate(series: list[list]) -> tuple[list[float], list[float]]:
    """A heartbeat's [t, step, samples, step_s] series -> (t, samples/s per interval) (pure): the
    samples of the steps finished in each interval over the step-phase seconds they took (the
    definition of ``run_samples_per_s``, one rank's share). Series written before step_s was
    recorded (three columns) fall back to wall seconds."""
    xs, ys = [], []
    for a, b in zip(series, series[1:]):
        if b[0] <= a[0] or a[2] is None or b[2] is None or b[2] < a[2]:
            continue
        dt = (b[3] - a[3]) if len(a) > 3 and len(b) > 3 else (b[0] - a[0])
        if dt > 0:
            xs.append(b[0])
            ys.append((b[2] - a[2]) / dt)
    return xs, ys


def step_quantiles(hb: dict) -> dict[str, float | None]:
    counts = (hb.get("step_hist") or {}).get("counts") or []
    return {q: hist_quantile(counts, v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))} | \
        {"steps": sum(counts)}


def startup_s(attempt: dict) -> float:
    """Seconds from the process start (the trainer's start) to its first step (pure): imports done,
    data opened, model built, checkpoint loaded. An attempt with no step yet is all start-up so far;
    heartbeats written before ``first_step_t`` existed give 0 (unknown: counted as idle)."""
    started, last = float(attempt.get("started", 0)), float(attempt.get("last", 0))
    if "first_step_t" not in attempt:
        return 0.0
    first = attempt["first_step_t"]
    end = last if first is None else min(float(first), last)
    return max(0.0, end - started)


def phase_totals(hb: dict) -> dict[str, float]:
    """One rank's seconds per phase over all its attempts, with start-up taken out of idle as
    ``startup`` (the heartbeat counts the time before the first step as idle) (pure)."""
    acc = dict.fromkeys(PHASES, 0.0)
    acc["startup"] = 0.0
    for att in hb.get("attempts") or [{"phase_s": hb.get("phase_s") or {}}]:
        ps = att.get("phase_s") or {}
        for k, v in ps.items():
            acc[k] = acc.get(k, 0.0) + float(v)
        su = min(startup_s(att), float(ps.get("idle", 0.0)))
        acc["idle"] -= su
        acc["startup"] += su
    return acc


def goodput(heartbeats: dict[int, dict]) -> dict[str, Any]:
    """Where the allocated time went, from every rank's attempts, averaged over ranks (pure).

    allocated = each attempt's first to last heartbeat (queue time between attempts is not
    allocated); start-up = process start to the first step; productive = step time
    (data+compute+comm) of steps that were kept; redone = step time of the steps an attempt did
    after its last checkpoint, which the next attempt repeated (estimated as those steps times the
    attempt's mean step time); the rest is checkpoint, eval and idle (waits outside the phases).

    goodput = productive / (allocated - the first attempt's start-up): launching costs what it
    costs and is stated apart (``startup_s``); the start-up of a requeued attempt is time lost to
    the requeue (``restart_s``, in ``lost_to_requeues_s``) and stays in the denominator.
    """
    per_rank = []
    for hb in heartbeats.values():
        atts = hb.get("attempts") or []
        rows = []
        for i, a in enumerate(atts):
            ps = a.get("phase_s") or {}
            alloc = max(0.0, float(a.get("last", 0)) - float(a.get("started", 0)))
            step_s = sum(float(ps.get(k, 0)) for k in STEP_PHASES)
            first, last = a.get("first_step"), a.get("last_step")
            redone = 0.0
            if i + 1 < len(atts) and first is not None and last is not None:
                nxt = atts[i + 1].get("first_step")
                steps = last - first + 1
                if nxt is not None and steps > 0 and last >= nxt:
                    redone = step_s * min(steps, last - nxt + 1) / steps
            start = min(startup_s(a), alloc)
            rows.append({"attempt": i, "restart_count": a.get("restart_count"), "allocated_s": alloc,
                         "startup_s": start, "productive_s": step_s - redone, "redone_s": redone,
                         "checkpoint_s": float(ps.get("checkpoint", 0)), "eval_s": float(ps.get("eval", 0)),
                         "idle_s": max(0.0, alloc - start - step_s - float(ps.get("checkpoint", 0))
                                       - float(ps.get("eval", 0))),
                         "queue_before_s": (float(a.get("started", 0)) - float(atts[i - 1].get("last", 0))) if i else 0.0,
                         "first_step": first, "last_step": last})
        per_rank.append(rows)
    if not per_rank or not per_rank[0]:
        return {"attempts": [], "goodput": None, "requeues": 0}
    n_att = min(len(r) for r in per_rank)
    keys = ("allocated_s", "startup_s", "productive_s", "redone_s", "checkpoint_s", "eval_s", "idle_s",
            "queue_before_s")
    attempts = []
    for i in range(n_att):
        row = {k: sum(r[i][k] for r in per_rank) / len(per_rank) for k in keys}
        row.update(attempt=i, restart_count=per_rank[0][i]["restart_count"],
                   first_step=per_rank[0][i]["first_step"], last_step=per_rank[0][i]["last_step"])
        attempts.append(row)
    alloc = sum(a["allocated_s"] for a in attempts)
    prod = sum(a["productive_s"] for a in attempts)
    start = attempts[0]["startup_s"]
    restart = sum(a["startup_s"] for a in attempts[1:])
    lost = sum(a["redone_s"] for a in attempts) + restart
    return {"attempts": attempts, "allocated_s": alloc, "startup_s": start, "restart_s": restart,
            "productive_s": prod, "goodput": prod / (alloc - start) if alloc - start > 0 else None,
            "requeues": n_att - 1, "lost_to_requeues_s": lost,
            "queue_s": sum(a["queue_before_s"] for a in attempts)}


def infer_progress(out: Path) -> dict[str, Any]:
    """Rows and rows/s of a batch-inference output dir (pure given the files).

    One definition for the table and the plot: rows/s = rows written / scoring seconds, where a
    rank's scoring seconds run from its first batch read to its last partition written (model
    loading excluded; ``scoring_s`` in _MANIFEST.json). All ranks together: every rank's rows over
    the slowest rank's seconds (the manifest's ``scoring_s``). The rows-over-time curve counts this
    run's partitions (sidecar mtime = when each finished) from an estimated scoring start (the last
    partition minus ``scoring_s``), so its mean slope is that same all-ranks figure.
    """
    man = {}
    if (out / INFER_MARKER).is_file():
        try:
            man = read_json(out / INFER_MARKER)
        except ValueError:
            man = {}
    parts = []
    for p in sorted((out / "_parts").glob("*.json")):
        try:
            rec = read_json(p)
        except ValueError:
            continue
        parts.append((p.stat().st_mtime, int(rec.get("rows", 0)), rec.get("file")))
    parts.sort()
    ranks = [{"rank": r.get("rank"), "rows": r.get("rows_written"), "scoring_s": r.get("scoring_s"),
              "rows_per_s": (r["rows_written"] / r["scoring_s"]) if r.get("scoring_s") else None,
              "written": r.get("written"), "skipped": r.get("skipped")} for r in man.get("ranks", [])]
    # Partitions a resumed job found complete were written by an earlier run, before this one began.
    skipped = sum(int(r.get("skipped") or 0) for r in ranks)
    mine = parts[skipped:] if 0 < skipped <= len(parts) else parts
    written = sum(int(r["rows"] or 0) for r in ranks)
    scoring_s = float(man["scoring_s"]) if man.get("scoring_s") else None
    all_ranks = {"rows": written, "scoring_s": scoring_s,
                 "rows_per_s": written / scoring_s if ranks and scoring_s else None}
    t_start = (mine[-1][0] - scoring_s) if mine and scoring_s else (mine[0][0] if mine else None)
    xs, cum, n = ([0.0], [0], 0) if mine and scoring_s else ([], [], 0)
    for t, rows, _ in mine:
        n += rows
        xs.append(max(0.0, t - t_start))
        cum.append(n)
    return {"manifest": man, "parts": parts, "ranks": ranks, "all_ranks": all_ranks,
            "rows": man.get("rows", sum(p[1] for p in parts)), "from_scoring_start": bool(mine and scoring_s),
            "series": (xs, cum)}
