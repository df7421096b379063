"""`hpc jobs`, `hpc logs`, `hpc cancel`: thin helpers over squeue/scancel and submitit's log folder.

Every `hpc submit` records its jobs in a small index (``$HPC_HOME/jobs/<id>.json``, default
``~/.hpc``): kind, run directory and log folder. `hpc logs` finds a job's logs there, or else
through ``scontrol show job`` (StdOut), so jobs submitted from another machine or by hand work too
while Slurm still knows them.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import TextIO

from hpc.launch import slurm
from hpc.util.io import atomic_write_json, read_json

_JOB = re.compile(r"^\d+(_\d+)?$")


def home() -> Path:
    return Path(os.environ.get("HPC_HOME") or Path.home() / ".hpc")


def check_job_id(job_id: str) -> str:
    job_id = str(job_id).strip()
    if not _JOB.match(job_id):
        raise ValueError(f"job id {job_id!r}: expected digits, or ARRAYJOB_INDEX such as 1234_5")
    return job_id


def record(job_id: str, kind: str, run_dir: str | Path, log_folder: str | Path, **extra) -> Path:
    """Remember a submitted job (atomic JSON; later readers never see half a file)."""
    path = home() / "jobs" / f"{job_id}.json"
    atomic_write_json(path, {"job_id": str(job_id), "kind": kind, "run_dir": str(run_dir),
                             "log_folder": str(log_folder), "submitted": time.time(), **extra})
    return path


def lookup(job_id: str) -> dict | None:
    path = home() / "jobs" / f"{check_job_id(job_id)}.json"
    return read_json(path) if path.is_file() else None


# ------------------------------------------------------------------------------- hpc jobs
def list_jobs(all_states: bool = False) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of this user's jobs; ``all_states`` adds the finished ones Slurm still knows."""
    args = ["squeue", "-h", "--me", "-o", "%i|%j|%T|%M|%l|%D|%R"]
    if all_states:
        args.insert(2, "--states=all")
    out = slurm.run(args).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) != 7:
            continue
        rec = lookup(parts[0]) if _JOB.match(parts[0]) else None
        rows.append(parts + [rec["run_dir"] if rec else ""])
    return ["JOBID", "NAME", "STATE", "TIME", "LIMIT", "NODES", "REASON/NODES", "RUN DIR"], rows


# ------------------------------------------------------------------------------- hpc logs
def _display_id(job_id: str, fields: dict[str, str]) -> str:
    """submitit names array members' logs ``<array>_<index>``; a member's own id maps to that."""
    array_job, index = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
    if array_job and index and index.isdigit() and "_" not in job_id:
        return f"{array_job}_{index}"
    return job_id


def log_paths(job_id: str, rank: int = 0) -> tuple[Path, Path]:
    """(stdout, stderr) of ``rank`` of ``job_id``: from the index, else from Slurm's StdOut path."""
    job_id = check_job_id(job_id)
    if rank < 0:
        raise ValueError(f"--rank {rank}: must be >= 0")
    rec = lookup(job_id)
    if rec is not None:
        folder = Path(rec["log_folder"].replace("%j", job_id))
        name = job_id
    else:
        try:
            fields = slurm.job_fields(job_id)
        except slurm.SlurmError as e:
            raise ValueError(f"job {job_id}: not submitted by hpc from here ({home() / 'jobs'}) and Slurm "
                             f"does not know it any more ({e})") from None
        stdout = fields.get("StdOut", "")
        if not stdout or stdout == "(null)":
            raise ValueError(f"job {job_id}: Slurm reports no StdOut path")
        folder, name = Path(stdout).parent, _display_id(job_id, fields)
    return folder / f"{name}_{rank}_log.out", folder / f"{name}_{rank}_log.err"


def show_logs(job_id: str, rank: int = 0, follow: bool = False, out: TextIO | None = None,
              poll_s: float = 1.0, stream: str = "both") -> int:
    """Print a rank's stdout and stderr; ``follow`` keeps printing until the job has finished."""
    out = sys.stdout if out is None else out  # looked up per call: sys.stdout may be replaced
    paths = log_paths(job_id, rank)
    wanted = [p for p, kind in zip(paths, ("out", "err")) if stream in ("both", kind)]
    if not follow:
        missing = [p for p in wanted if not p.exists()]
        if len(missing) == len(wanted):
            raise ValueError(f"job {job_id} rank {rank}: no log yet at {wanted[0]} (pending, or no such "
                             "rank: ranks are 0..ntasks-1)")
        for p in wanted:
            if p.exists():
                out.write(f"==> {p} <==\n{p.read_text(errors='replace')}")
        out.flush()
        return 0
    offsets = {p: 0 for p in wanted}
    while True:
        done = slurm.job_state(job_id) not in slurm.ACTIVE_STATES
        for p in wanted:
            if p.exists():
                with open(p, errors="replace") as f:
                    f.seek(offsets[p])
                    chunk = f.read()
                    offsets[p] = f.tell()
                if chunk:
                    out.write(chunk)
                    out.flush()
        if done:  # one last read above happened after the job ended: nothing is lost
            return 0
        time.sleep(poll_s)


# ------------------------------------------------------------------------------- hpc cancel
FINAL = ("CANCELLED", "COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE", "UNKNOWN")


def cancel(job_id: str, wait_s: float = 10.0) -> str:
    """scancel, then report what Slurm did: the job's state once it reaches a final one (or what
    it is after ``wait_s``), never a bare "cancelled" Slurm may not have done."""
    job_id = check_job_id(job_id)
    before = slurm.job_state(job_id)
    slurm.run(["scancel", job_id])
    deadline = time.monotonic() + wait_s
    state = slurm.job_state(job_id)
    while state.split()[0] not in FINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        state = slurm.job_state(job_id)
    state = state.split()[0] if state.strip() else "UNKNOWN"
    if state == "CANCELLED":
        return f"job {job_id}: CANCELLED by Slurm (was {before})"
    if state in FINAL:
        return f"job {job_id}: scancel sent, but Slurm reports {state} (was {before})"
    return f"job {job_id}: scancel sent; still {state} after {wait_s:g}s (was {before}); see `hpc jobs --all`"
