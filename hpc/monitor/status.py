"""`hpc status RUN_DIR|JOB_ID`: where a run is, read from the files in its run directory.

Sources (all optional except that one must exist): ``heartbeat/rank-R.json`` (live per-rank state),
``summary.json`` (final state, written by the trainer at the end), ``checkpoints/latest`` (last
checkpoint), ``hang-report/summary.json`` (the watchdog's verdict), ``metrics.jsonl`` (last step
when there are no heartbeats). ``collect_status`` is pure given the files and ``now``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from hpc.monitor.heartbeat import read_heartbeats
from hpc.util.io import read_json

FINAL_STATES = ("completed", "done", "failed", "hung", "preempted", "cancelled")  # trainer + heartbeat states


def stale_after(interval_s: float) -> float:
    """A heartbeat older than this means the writer thread stopped: process dead or wedged."""
    return 3 * interval_s + 2


def last_jsonl(path: Path, max_bytes: int = 1 << 16) -> dict | None:
    """The last complete JSON record of a JSONL file (reads only its tail)."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
        lines = f.read().splitlines()
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being appended right now, or the cut first line of the tail
        if isinstance(rec, dict):
            return rec
    return None


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
    summary = _maybe_json(run_dir / "summary.json")
    hang = _maybe_json(run_dir / "hang-report" / "summary.json")
    last_metric = last_jsonl(run_dir / "metrics.jsonl")
    if not beats and summary is None and last_metric is None:
        raise ValueError(f"{run_dir}: not a run directory (no heartbeat/, summary.json or metrics.jsonl); "
                         "pass runs/<name>/<id> as written by `hpc train`")
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
    for hb in beats.values():  # whole run: every attempt (requeue) of every rank
        for att in hb.get("attempts") or [{"phase_s": hb.get("phase_s") or {}}]:
            for k, v in (att.get("phase_s") or {}).items():
                phase_tot[k] = phase_tot.get(k, 0.0) + float(v)
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
    sps = [r["samples_per_s"] for r in ranks if r["samples_per_s"] is not None and r["state"] == "running"]
    return {
        "run_dir": str(run_dir), "state": state, "why": why, "step": step, "epoch": epoch,
        "total_steps": total, "eta_s": eta,
        "samples_per_s": round(sum(sps), 2) if sps else (summary or {}).get("samples_per_s"),
        "ranks": ranks, "world_size": lead.get("world_size") or summ.get("world_size"),
        "fractions": fractions, "checkpoint": last_checkpoint(run_dir, now),
        "requeues": max(restarts, default=0),
        "job_id": lead.get("job_id") or ((summary or {}).get("slurm") or {}).get("job_id"),
        "hang": hang, "metrics": (summary or {}).get("metrics"),
        "past_hang_reports": sorted(p.name for p in run_dir.glob("hang-report.*") if p.is_dir()),
    }


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
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_status(st: dict) -> str:
    """Human-readable status (pure)."""
    job = f"  (job {st['job_id']}, requeued {st['requeues']}x)" if st.get("job_id") else \
        (f"  (requeued {st['requeues']}x)" if st["requeues"] else "")
    progress = f"step {st['step']}"
    if st.get("total_steps") and st["step"] is not None:
        progress += f"/{st['total_steps']} ({100 * st['step'] / st['total_steps']:.0f}%)"
    lines = [f"run        {st['run_dir']}{job}",
             f"state      {st['state']}: {st['why']}",
             f"progress   {progress}, epoch {st['epoch']}, ETA {_dur(st['eta_s'])}"]
    if st.get("samples_per_s") is not None:
        lines.append(f"throughput {st['samples_per_s']:,.1f} samples/s over {st['world_size'] or len(st['ranks']) or '?'} ranks")
    if st["fractions"]:
        f = st["fractions"]
        other = 1 - sum(f.get(k, 0) for k in ("data", "comm", "compute"))
        lines.append("time       " + "  ".join(f"{k} {100 * f.get(k, 0):.0f}%" for k in ("data", "comm", "compute"))
                     + f"  other {100 * other:.0f}% (checkpoint {100 * f.get('checkpoint', 0):.0f}%, "
                       f"eval {100 * f.get('eval', 0):.0f}%, idle {100 * f.get('idle', 0):.0f}%)")
    if st.get("past_hang_reports"):
        lines.append(f"hangs      {len(st['past_hang_reports'])} in earlier attempts: "
                     + ", ".join(st["past_hang_reports"]))
    ck = st.get("checkpoint")
    lines.append(f"checkpoint {ck['name']}, {_dur(ck['age_s'])} ago" if ck else "checkpoint none yet")
    if st.get("metrics"):
        lines.append("metrics    " + json.dumps(st["metrics"], sort_keys=True, default=str)[:200])
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


def find_run_for_job(job_id: str, roots: list[Path]) -> Path:
    """The run directory of Slurm job ``job_id``.

    First the job index `hpc submit` keeps (``hpc.launch.jobs.lookup``); else the newest run
    directory under each root, or under ``<workdir>/runs`` of the job as squeue reports it, whose
    heartbeats or summary.json name the job.
    """
    try:
        from hpc.launch.jobs import lookup
        rec = lookup(job_id)
    except (ImportError, ValueError):
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
        from hpc.launch.slurm import SlurmError, run
    except ImportError:
        return None
    try:
        out = run(["squeue", "-h", "-j", str(job_id), "-o", "%Z"], timeout=20, check=False).stdout.strip()
    except (SlurmError, OSError):
        return None
    return Path(out.splitlines()[0]) if out else None
