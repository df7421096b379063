"""`hpc status RUN_DIR|JOB_ID|CONFIG`: where a run is, read from the files in its run directory.

Sources (all optional): ``heartbeat/rank-R.json`` (live per-rank state), ``summary.json`` (final
state and metrics, written by the trainer at the end), ``checkpoints/latest`` (last checkpoint),
``hang-report/summary.json`` (the watchdog's verdict), ``metrics.jsonl`` (the latest train loss,
lr, samples/s and val metrics; the step when there are no heartbeats). A run directory with none
of these but the trainer's first files (``config.yaml``, ``logs/``) is starting. ``collect_status``
is pure given the files and ``now``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from hpc.instrument.heartbeat import heartbeat_path, read_heartbeats
from hpc.launch.jobs import lookup
from hpc.launch.slurm import SlurmError, run
from hpc.monitor.rundata import phase_totals, run_samples_per_s
from hpc.train.config import load_config, resolve_path
from hpc.util.io import read_json
from hpc.util.progress import format_duration

FINAL_STATES = ("completed", "done", "failed", "hung", "preempted", "cancelled")  # trainer + heartbeat states
# What the trainer writes first (rundir.setup_logging, Trainer.__init__): a run directory that has
# only these is starting (imports, data, model, checkpoint load) and has no heartbeat yet.
FIRST_FILES = ("config.yaml", "logs")


def stale_after(interval_s: float) -> float:
    """A heartbeat older than this means the writer thread stopped: process dead or wedged."""
    return 3 * interval_s + 2


def tail_records(path: Path, kinds: tuple[str, ...] = ("train", "val", "test"),
                 max_bytes: int = 1 << 22) -> dict[str, dict]:
    """The last complete record of each ``kind`` in a JSONL file, plus ``"last"`` (any kind).

    Reads the tail only, doubling it (64 KiB up to ``max_bytes``) until every kind is found: a
    long run's val records can be far apart, but status must not read a whole large file.
    """
    found: dict[str, dict] = {}
    if not path.is_file():
        return found
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        chunk = 1 << 16
        while True:
            f.seek(max(0, size - chunk))
            lines = f.read().splitlines()
            found = {}
            for line in reversed(lines):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line being appended right now, or the cut first line of the tail
                if not isinstance(rec, dict):
                    continue
                found.setdefault("last", rec)
                if rec.get("kind") in kinds:
                    found.setdefault(rec["kind"], rec)
                if all(k in found for k in kinds):
                    return found
            if chunk >= size or chunk >= max_bytes:
                return found
            chunk *= 2


def last_line(path: Path, max_bytes: int = 4096) -> str | None:
    """The last non-empty line of a text file (a log), or None."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
        lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else None


def last_checkpoint(run_dir: Path, now: float) -> dict | None:
    ckpt = run_dir / "checkpoints"
    pointer = ckpt / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        target = ckpt / name
        mtime = (target if target.exists() else pointer).stat().st_mtime
    else:
        steps = sorted(p for p in ckpt.glob("step-*") if p.is_dir()) if ckpt.is_dir() else []
        if not steps:
            return None
        name, mtime = steps[-1].name, steps[-1].stat().st_mtime
    m = re.search(r"(\d+)$", name)
    return {"name": name, "step": int(m.group(1)) if m else None, "age_s": round(now - mtime, 1)}


def collect_status(run_dir: str | os.PathLike, now: float | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: run directory not found")
    beats = read_heartbeats(run_dir)
    # Every trainer process rewrites config.yaml when it starts: a summary, hang report or heartbeat
    # older than that was left by an earlier process of this run (requeued or resumed). File times
    # on both sides, so clock skew between nodes does not matter.
    restarted = _mtime(run_dir / "config.yaml")
    earlier = lambda p: restarted is not None and (_mtime(p) or 0) < restarted  # noqa: E731
    summary = None if earlier(run_dir / "summary.json") else _maybe_json(run_dir / "summary.json")
    hang_path = run_dir / "hang-report" / "summary.json"
    hang = None if earlier(hang_path) else _maybe_json(hang_path)
    tail = tail_records(run_dir / "metrics.jsonl")
    last_metric = tail.get("last")
    if not beats and summary is None and last_metric is None:
        if not any((run_dir / f).exists() for f in FIRST_FILES):
            raise ValueError(f"{run_dir}: not a run directory (no heartbeat/, summary.json, metrics.jsonl, "
                             "config.yaml or logs/); pass runs/<name>/<id> as written by `hpc train`, "
                             "or the config's name")
        return _starting(run_dir, now)
    if beats and summary is None and hang is None and \
            all(earlier(heartbeat_path(run_dir, r)) for r in beats):
        return _starting(run_dir, now, restarted_from=beats)
    ranks = []
    for r, hb in sorted(beats.items()):
        age = now - float(hb.get("time", 0))
        ranks.append({"rank": r, "host": hb.get("host"), "pid": hb.get("pid"), "step": hb.get("step"),
                      "epoch": hb.get("epoch"), "phase": hb.get("phase"),
                      "phase_elapsed_s": hb.get("phase_elapsed_s"), "samples_per_s": hb.get("samples_per_s"),
                      "heartbeat_age_s": round(age, 1), "state": hb.get("state"),
                      "stale": hb.get("state") == "running" and age > stale_after(float(hb.get("interval_s") or 5))})
    lead = beats.get(0) or (next(iter(beats.values())) if beats else {})
    summ = summary or {}
    steps = [r["step"] for r in ranks if r["step"] is not None]
    step = min(steps) if steps else summ.get("step", (last_metric or {}).get("step"))
    epoch = lead["epoch"] if lead.get("epoch") is not None else summ.get("epoch", (last_metric or {}).get("epoch"))
    total = lead.get("total_steps") or summ.get("total_steps")
    rates = [hb.get("steps_per_s") for hb in beats.values() if hb.get("steps_per_s")]
    eta = None
    if total and step is not None and rates and min(rates) > 0:
        eta = round(max(0, total - step) / min(rates), 1)  # the slowest rank sets the pace
    state, why = _state(summary, hang, ranks)
    if state in FINAL_STATES:
        eta = None
    phase_tot: dict[str, float] = {}
    for hb in beats.values():  # whole run: every attempt (requeue) of every rank, start-up apart
        for k, v in phase_totals(hb).items():
            phase_tot[k] = phase_tot.get(k, 0.0) + v
    busy = sum(phase_tot.values())
    fractions = {k: round(v / busy, 4) for k, v in phase_tot.items()} if busy > 0 else {}
    tf = summ.get("time_fractions") or {}
    if not fractions and "data_wait" in tf:  # no heartbeats: the trainer's own split of its step time
        fractions = {"data": tf["data_wait"], "comm": tf.get("comm_wait", 0.0),
                     "compute": max(0.0, 1 - tf["data_wait"] - tf.get("comm_wait", 0.0))}
    restarts = [int(hb.get("restart_count") or 0) for hb in beats.values()]
    restarts += [len(hb.get("attempts") or [1]) - 1 for hb in beats.values()]
    if summary:
        restarts.append(int((summary.get("slurm") or {}).get("restart_count") or 0))
    sps, sps_from = run_samples_per_s(summary, tail.get("train"), beats)
    return {
        "run_dir": str(run_dir), "state": state, "why": why, "step": step, "epoch": epoch,
        "total_steps": total, "eta_s": eta, "samples_per_s": None if sps is None else round(sps, 2),
        "samples_per_s_from": sps_from,
        "ranks": ranks, "world_size": lead.get("world_size") or summ.get("world_size"),
        "fractions": fractions, "checkpoint": last_checkpoint(run_dir, now),
        "requeues": max(restarts, default=0),
        "job_id": lead.get("job_id") or ((summary or {}).get("slurm") or {}).get("job_id"),
        "hang": hang, "train": _latest(tail.get("train")), "val": _latest(tail.get("val")),
        "metrics": (summary or {}).get("metrics"),
        "past_hang_reports": sorted(p.name for p in run_dir.glob("hang-report.*") if p.is_dir()),
    }


def _starting(run_dir: Path, now: float, restarted_from: dict[int, dict] | None = None) -> dict[str, Any]:
    """Status of a run directory the trainer created (or a new process of it restarted in) but has
    written nothing live into yet."""
    if restarted_from:
        hb = restarted_from.get(0) or next(iter(restarted_from.values()))
        age = now - (_mtime(run_dir / "config.yaml") or now)
        why = (f"restarted {_dur(age)} ago (requeue or resume; the previous process's last heartbeat: "
               f"{hb.get('state')} at step {hb.get('step')}); no heartbeat from this process yet (it loads "
               "the data, the model and the last checkpoint)")
    else:
        first = [run_dir / f for f in FIRST_FILES if (run_dir / f).exists()]
        age = now - min(p.stat().st_mtime for p in first)
        why = (f"run directory created {_dur(age)} ago; no heartbeat, metrics or summary yet (the trainer "
               "imports, opens the data, builds the model, loads a checkpoint)")
    if age > 600:
        why += "; if no process of it runs any more, it died while starting: see logs/"
    return {"run_dir": str(run_dir), "state": "starting", "why": why, "step": None, "epoch": None,
            "total_steps": None, "eta_s": None, "samples_per_s": None, "samples_per_s_from": None,
            "ranks": [], "world_size": None, "fractions": {}, "checkpoint": last_checkpoint(run_dir, now),
            "requeues": 0, "job_id": None, "hang": None, "train": None, "val": None, "metrics": None,
            "past_hang_reports": [], "last_log": last_line(run_dir / "logs" / "rank-0.log")}


def _latest(rec: dict | None) -> dict | None:
    """A metrics.jsonl record's step and numbers (for the loss/val lines)."""
    if not rec:
        return None
    return {k: v for k, v in rec.items() if k not in ("kind", "time") and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _state(summary: dict | None, hang: dict | None, ranks: list[dict]) -> tuple[str, str]:
    if summary and summary.get("state"):
        return str(summary["state"]), "summary.json"
    if hang:
        behind = ", ".join(str(b["rank"]) for b in hang.get("behind", [])) or "none"
        return "hung", f"watchdog of rank {hang.get('noticed_by')}: ranks behind: {behind} (hang-report/)"
    if not ranks:
        return "unknown", "no heartbeats and no summary.json: the trainer runs without a heartbeat"
    ended = [r for r in ranks if r["state"] not in (None, "running")]
    if ended and len(ended) == len(ranks):
        worst = next((r for r in ended if r["state"] not in ("completed", "done")), ended[0])
        return str(worst["state"]), f"final heartbeat of rank {worst['rank']} (no summary.json)"
    stale = [r for r in ranks if r["stale"]]
    if stale:
        return "stale", (f"no heartbeat from rank(s) {', '.join(str(r['rank']) for r in stale)} for "
                         f"{max(r['heartbeat_age_s'] for r in stale):.0f}s: the job died without a summary, "
                         "was killed (time limit, OOM), or is wedged; check `hpc logs` / `sacct`")
    return "running", "heartbeats are fresh"


def _maybe_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = read_json(path)
    except ValueError:
        return None  # being replaced right now, or damaged: status is best-effort
    return obj if isinstance(obj, dict) else None


def _dur(s: float | None) -> str:
    return "-" if s is None else format_duration(s)


def _num(v: Any) -> str:
    """A metric for people: integers as such, floats to 4-5 significant digits, no exponent noise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else str(v)
    if isinstance(v, int) or (float(v).is_integer() and abs(v) >= 100):  # counts (samples=200.0)
        return f"{int(v):,}"
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:,.1f}"
    return f"{v:.4f}" if abs(v) >= 0.01 else f"{v:.4g}"


def metrics_table(metrics: dict, indent: str = "  ") -> list[str]:
    """summary.json's {split: {metric: value}} as aligned lines: one row per metric, one column per
    split (val: the best evaluation, test: the best model); '-' where a split lacks a metric."""
    order = {"train": 0, "val": 1, "test": 2}
    splits = sorted((k for k, v in metrics.items() if isinstance(v, dict) and v), key=lambda k: (order.get(k, 3), k))
    if not splits:
        return []
    names = sorted({m for sp in splits for m in metrics[sp]})
    cells = [[_num(metrics[sp].get(m)) for sp in splits] for m in names]
    w0 = max(len("metric"), *(len(m) for m in names))
    ws = [max(len(sp), *(len(row[i]) for row in cells)) for i, sp in enumerate(splits)]
    lines = [indent + f"{'metric':<{w0}}" + "".join(f"  {sp:>{w}}" for sp, w in zip(splits, ws))]
    for m, row in zip(names, cells):
        lines.append(indent + f"{m:<{w0}}" + "".join(f"  {c:>{w}}" for c, w in zip(row, ws)))
    return lines


def format_status(st: dict) -> str:
    """Human-readable status (pure)."""
    job = f"  (job {st['job_id']}, requeued {st['requeues']}x)" if st.get("job_id") else \
        (f"  (requeued {st['requeues']}x)" if st["requeues"] else "")
    lines = [f"run        {st['run_dir']}{job}", f"state      {st['state']}: {st['why']}"]
    if st["state"] == "starting":
        if st.get("last_log"):
            lines.append(f"last log   {st['last_log'][:160]}")
        return "\n".join(lines)
    progress = f"step {st['step']}"
    if st.get("total_steps") and st["step"] is not None:
        progress += f"/{st['total_steps']} ({100 * st['step'] / st['total_steps']:.0f}%)"
    lines.append(f"progress   {progress}, epoch {st['epoch']}, ETA {_dur(st['eta_s'])}")
    tr = st.get("train")
    if tr and tr.get("loss") is not None:
        extra = "".join(f"  {label} {_num(tr[k])}" for k, label in (("lr", "lr"), ("grad_norm", "grad norm"))
                        if tr.get(k) is not None)
        lines.append(f"loss       {_num(tr['loss'])} (train, step {tr.get('step')}){extra}")
    val = st.get("val")
    if val and not st.get("metrics"):  # while running; at the end the final table says it
        vals = "  ".join(f"{k} {_num(v)}" for k, v in sorted(val.items()) if k not in ("step", "epoch", "samples"))
        lines.append(f"val        {vals} (step {val.get('step')})")
    if st.get("samples_per_s") is not None:
        n = st["world_size"] or len(st["ranks"]) or "?"
        lines.append(f"throughput {st['samples_per_s']:,.1f} samples/s over {n} rank{'' if n == 1 else 's'} "
                     f"(step time only; from {st['samples_per_s_from']})")
    if st["fractions"]:
        f = st["fractions"]
        other = 1 - sum(f.get(k, 0) for k in ("data", "comm", "compute"))
        lines.append("time       " + "  ".join(f"{k} {100 * f.get(k, 0):.0f}%" for k in ("data", "comm", "compute"))
                     + f"  other {100 * other:.0f}% (checkpoint {100 * f.get('checkpoint', 0):.0f}%, "
                       f"eval {100 * f.get('eval', 0):.0f}%, idle {100 * f.get('idle', 0):.0f}%, "
                       f"start-up {100 * f.get('startup', 0):.0f}%)")
    if st.get("past_hang_reports"):
        lines.append(f"hangs      {len(st['past_hang_reports'])} in earlier attempts: "
                     + ", ".join(st["past_hang_reports"]))
    ck = st.get("checkpoint")
    lines.append(f"checkpoint {ck['name']}, {_dur(ck['age_s'])} ago" if ck else "checkpoint none yet")
    table = metrics_table(st.get("metrics") or {})
    if table:
        lines += ["", "final metrics (val: the best evaluation; test: the best model)"] + table
    if st["ranks"]:
        lines += ["", f"{'rank':>4}  {'host':<12} {'step':>8} {'phase':<10} {'in phase':>8} "
                      f"{'samples/s':>10} {'heartbeat':>10}  state"]
        for r in st["ranks"]:
            sps = "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:,.1f}"
            flag = "  STALE" if r["stale"] else ""
            lines.append(f"{r['rank']:>4}  {str(r['host'])[:12]:<12} {str(r['step']):>8} {str(r['phase']):<10} "
                         f"{_dur(r['phase_elapsed_s']):>8} {sps:>10} {_dur(r['heartbeat_age_s']) + ' ago':>10}  "
                         f"{r['state']}{flag}")
    return "\n".join(lines)


def newest_run(base: Path) -> Path | None:
    """The most recently started run directory directly under ``base`` (``<out_dir>/<name>``).

    Started = its config.yaml's mtime (the trainer writes it when it starts or resumes); a
    directory's own mtime would move when an older run finishes and writes summary.json.
    """
    def started(d: Path) -> float:
        cfg = d / "config.yaml"
        return (cfg if cfg.is_file() else d).stat().st_mtime
    runs = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")] if base.is_dir() else []
    return max(runs, key=started) if runs else None


def runs_of_config(spec: str, overrides: list[str] | tuple = ()) -> Path:
    """``<out_dir>/<name>`` of a config (a path, or the name of a shipped config) with overrides."""
    cfg = load_config(resolve_path(spec), list(overrides))
    return Path(cfg.out_dir) / cfg.name


def find_run_for_job(job_id: str, roots: list[Path]) -> Path:
    """The run directory of Slurm job ``job_id``.

    First the job index `hpc submit` keeps (``hpc.launch.jobs.lookup``); else the newest run
    directory under each root, or under ``<workdir>/runs`` of the job as squeue reports it, whose
    heartbeats or summary.json name the job.
    """
    try:
        rec = lookup(job_id)
    except ValueError:
        rec = None
    if rec and rec.get("run_dir") and Path(rec["run_dir"]).is_dir():
        return Path(rec["run_dir"])
    roots = list(roots)
    workdir = _squeue_workdir(job_id)
    if workdir is not None:
        roots.append(workdir / "runs")
    seen, found = set(), []
    for root in roots:
        if not root.is_dir() or root.resolve() in seen:
            continue
        seen.add(root.resolve())
        for cand in list(root.glob("*/*/heartbeat/rank-0.json")) + list(root.glob("*/*/summary.json")):
            obj = _maybe_json(cand) or {}
            jid = obj.get("job_id") or (obj.get("slurm") or {}).get("job_id")
            if jid is not None and str(jid) == str(job_id):
                run = cand.parent.parent if cand.parent.name == "heartbeat" else cand.parent
                found.append((cand.stat().st_mtime, run))
    if not found:
        where = ", ".join(str(r) for r in roots) or "(nowhere)"
        raise ValueError(f"job {job_id}: no run directory found under {where}; pass the run directory "
                         "itself (runs/<name>/<id>) or --runs-root DIR")
    return max(found)[1]


def _squeue_workdir(job_id: str) -> Path | None:
    try:
        out = run(["squeue", "-h", "-j", str(job_id), "-o", "%Z"], timeout=20, check=False).stdout.strip()
    except (SlurmError, OSError):
        return None
    return Path(out.splitlines()[0]) if out else None
