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

from hpc.monitor.heartbeat import STEP_PHASES, hist_quantile, read_heartbeats
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


def global_batch(rd: RunData) -> int | None:
    try:
        return int(rd.config["data"]["batch_size"]) * int((rd.config.get("train") or {}).get("grad_accum", 1))
    except (KeyError, TypeError, ValueError):
        return None


def throughput_from_metrics(metrics: list[dict], batch: int | None) -> tuple[list[float], list[float]]:
    """(epoch time, samples/s) between consecutive train records (pure).

    With the global batch known, the rate is Δstep·batch/Δtime (what happened in that window); else
    the trainer's own running average. A window across a requeue (the step goes back, or the gap is
    over 5x the median) becomes a NaN point, which breaks the plotted line instead of bridging it.
    """
    recs = [r for r in metrics if r.get("kind") == "train" and r.get("time") is not None and r.get("step") is not None]
    if not recs:
        return [], []
    xs, ys = [], []
    dts = sorted(b["time"] - a["time"] for a, b in zip(recs, recs[1:]))
    gap = 5 * dts[len(dts) // 2] if dts else 0.0
    for a, b in zip(recs, recs[1:]):
        dt, ds = b["time"] - a["time"], b["step"] - a["step"]
        if ds <= 0 or (gap > 0 and dt > gap):  # a requeue (step goes back, or a long pause): break the line
            xs.append(b["time"])
            ys.append(float("nan"))
        elif batch and dt > 0:
            xs.append(b["time"])
            ys.append(ds * batch / dt)
        elif not batch and b.get("samples_per_s") is not None:
            xs.append(b["time"])
            ys.append(float(b["samples_per_s"]))
    return xs, ys


def series_rate(series: list[list]) -> tuple[list[float], list[float]]:
    """A heartbeat's [t, step, samples] series -> (t, samples/s per interval) (pure)."""
    xs, ys = [], []
    for a, b in zip(series, series[1:]):
        if b[0] > a[0] and a[2] is not None and b[2] is not None and b[2] >= a[2]:
            xs.append(b[0])
            ys.append((b[2] - a[2]) / (b[0] - a[0]))
    return xs, ys


def step_quantiles(hb: dict) -> dict[str, float | None]:
    counts = (hb.get("step_hist") or {}).get("counts") or []
    return {q: hist_quantile(counts, v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))} | \
        {"steps": sum(counts)}


def goodput(heartbeats: dict[int, dict]) -> dict[str, Any]:
    """Where the allocated time went, from every rank's attempts, averaged over ranks (pure).

    allocated = each attempt's first to last heartbeat (queue time between attempts is not
    allocated); productive = step time (data+compute+comm) of steps that were kept; redone = step
    time of the steps an attempt did after its last checkpoint, which the next attempt repeated
    (estimated as those steps times the attempt's mean step time); the rest is checkpoint, eval
    and idle (start-up, loading, waiting at the end).
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
            rows.append({"attempt": i, "restart_count": a.get("restart_count"), "allocated_s": alloc,
                         "productive_s": step_s - redone, "redone_s": redone,
                         "checkpoint_s": float(ps.get("checkpoint", 0)), "eval_s": float(ps.get("eval", 0)),
                         "idle_s": max(0.0, alloc - step_s - float(ps.get("checkpoint", 0)) - float(ps.get("eval", 0))),
                         "queue_before_s": (float(a.get("started", 0)) - float(atts[i - 1].get("last", 0))) if i else 0.0,
                         "first_step": first, "last_step": last})
        per_rank.append(rows)
    if not per_rank or not per_rank[0]:
        return {"attempts": [], "goodput": None, "requeues": 0}
    n_att = min(len(r) for r in per_rank)
    keys = ("allocated_s", "productive_s", "redone_s", "checkpoint_s", "eval_s", "idle_s", "queue_before_s")
    attempts = []
    for i in range(n_att):
        row = {k: sum(r[i][k] for r in per_rank) / len(per_rank) for k in keys}
        row.update(attempt=i, restart_count=per_rank[0][i]["restart_count"],
                   first_step=per_rank[0][i]["first_step"], last_step=per_rank[0][i]["last_step"])
        attempts.append(row)
    alloc = sum(a["allocated_s"] for a in attempts)
    prod = sum(a["productive_s"] for a in attempts)
    lost = sum(a["redone_s"] for a in attempts) + sum(a["idle_s"] for a in attempts[1:])
    return {"attempts": attempts, "allocated_s": alloc, "productive_s": prod,
            "goodput": prod / alloc if alloc > 0 else None, "requeues": n_att - 1,
            "lost_to_requeues_s": lost, "queue_s": sum(a["queue_before_s"] for a in attempts)}


def infer_progress(out: Path) -> dict[str, Any]:
    """Rows over time of a batch-inference output dir: per partition completion (sidecar mtime)."""
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
    return {"manifest": man, "parts": parts, "ranks": ranks,
            "rows": man.get("rows", sum(p[1] for p in parts))}
