"""What runs inside a submitted job: module-level functions submitit pickles by reference.

Every task runs once per Slurm task (rank). Train tasks pin ``run_id`` to the Slurm job id, the
same name submitit gives the log folder (``%j``), so a requeued job finds its own checkpoints and
the run directory and the submitit logs stay together.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Sequence



def job_run_id(env: Mapping[str, str] | None = None) -> str | None:
    """``slurm-<job>`` or ``slurm-<array job>_<index>`` (submitit's ``%j``); None outside Slurm."""
    env = os.environ if env is None else env
    array_job, index = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and index:
        return f"slurm-{array_job}_{index}"
    job = env.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else None


def with_run_id(overrides: Sequence[str], run_id: str | None) -> list[str]:
    out = list(overrides)
    if run_id and not any(o.split("=", 1)[0].strip() == "run_id" for o in out):
        out.append(f"run_id={run_id}")
    return out


def train_task(config: str, overrides: Sequence[str], run_id: str | None = None, nproc: int = 1) -> dict:
    """Train on this rank (or, ``nproc > 1`` outside Slurm, on N local MPI ranks); the run summary."""
    overrides = with_run_id(overrides, run_id or job_run_id())
    if nproc > 1:
        from hpc.dist.spawn import launch_local
        from hpc.train.config import load_config
        from hpc.util.io import read_json

        rc = launch_local(nproc, ["train", config, *overrides])
        cfg = load_config(config, overrides)
        if rc != 0:
            raise RuntimeError(f"hpc train on {nproc} local ranks exited {rc}")
        return read_json(Path(cfg.out_dir) / cfg.name / str(cfg.run_id) / "summary.json")
    from hpc.train import run
    from hpc.train.preempt import EXIT_PREEMPTED

    summary = run(config, overrides)
    if isinstance(summary, dict) and summary.get("state") == "preempted":
        # Checkpointed (and requeued when allowed). A SystemExit makes submitit write no result,
        # so the client keeps waiting for the requeued run instead of reading this interim
        # summary; when not requeued, the job ends FAILED with this status, as it should.
        sys.exit(EXIT_PREEMPTED)
    if isinstance(summary, dict) and summary.get("state") not in (None, "completed"):
        # A failed run must fail its Slurm job, or an afterok chain would go on with it.
        raise RuntimeError(f"training ended {summary.get('state')}: {summary.get('reason')} "
                           f"(run directory {summary.get('run_dir')})")
    return summary


def cli_task(argv: Sequence[str]) -> int:
    """Run ``hpc ARGV`` in this process; a non-zero exit fails the job with the command in the error."""
    from hpc.cli import main

    rc = main(list(argv))
    if rc != 0:
        raise RuntimeError(f"`hpc {' '.join(argv)}` exited {rc}")
    return rc


def register_task(run_dir: str, name: str, alias: str, source: str = "best", root: str | None = None) -> str:
    """Pipeline stage 2: register the trained run and point ``alias`` at it; returns NAME@VERSION."""
    from hpc.registry import Registry

    reg = Registry(root)
    version = reg.add(run_dir, name, source=source)
    reg.promote(name, version, alias)
    return f"{name}@{version}"
