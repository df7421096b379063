"""What runs inside a submitted job: module-level functions submitit pickles by reference.

Every task runs once per Slurm task (rank) and takes typed work (a config path and overrides, an
``InferConfig``), never an ``hpc ...`` command line. Train tasks pin ``run_id`` to the Slurm job id,
the same name submitit gives the log folder (``%j``), so a requeued job finds its own checkpoints and
the run directory and the submitit logs stay together.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from hpc import train
from hpc.dist.spawn import launch_local
from hpc.dist.world import World, world_from_env
from hpc.infer.job import InferConfig
from hpc.infer.job import run as run_infer
from hpc.infer.output import MANIFEST
from hpc.launch.requeue import hang_requeuer, requeue_after_preemption
from hpc.registry import Registry
from hpc.train.config import load_config
from hpc.train.preempt import EXIT_PREEMPTED, requeue_signal, requeues
from hpc.train.rundir import run_logging
from hpc.util.io import read_json
from hpc.util.progress import progress_interval_s


def job_run_id(world: World | None = None) -> str | None:
    """``slurm-<job>`` or ``slurm-<array job>_<index>`` (submitit's ``%j``); None outside Slurm."""
    w = world_from_env() if world is None else world
    if w.slurm_array_job_id and w.slurm_array_task_id is not None:
        return f"slurm-{w.slurm_array_job_id}_{w.slurm_array_task_id}"
    return f"slurm-{w.slurm_job_id}" if w.slurm_job_id else None


def with_run_id(overrides: Sequence[str], run_id: str | None) -> list[str]:
    out = list(overrides)
    if run_id and not any(o.split("=", 1)[0].strip() == "run_id" for o in out):
        out.append(f"run_id={run_id}")
    return out


def run_training(config, overrides: Sequence[str] = ()) -> dict:
    """``hpc.train.run`` on this rank, plus what depends on how it was launched: under Slurm, rank 0
    requeues the job when the run ends preempted (checkpointed), and the hang watchdog requeues it
    first when ``monitor.on_hang=requeue``. What ``hpc train`` and the submitted train tasks run."""
    world = world_from_env()
    summary = train.run(config, overrides, on_hang=hang_requeuer(world))
    if summary.get("state") == "preempted":
        preemption = summary.get("preemption") or {}
        sig = preemption.get("signal")
        if not requeues(sig):
            # SIGTERM: scancel / hpc cancel, a node shutdown, or Slurm's own preemption (which
            # requeues by itself). Requeueing here would undo a cancel: the job ends instead.
            preemption["requeue"] = (f"not requeued: {sig} ends the job (cancel or shutdown); only "
                                     f"{requeue_signal()} requeues")
        elif world.is_main:
            preemption["requeue"] = requeue_after_preemption(world, preemption.get("checkpoint_s"))
        else:
            preemption["requeue"] = "rank 0 handles the requeue"
        # In the run's log (stderr and logs/rank-R.log), which the trainer has closed by now.
        with run_logging(world.rank, summary.get("run_dir")) as log:
            log.warning("preempted by %s at step %s: checkpoint written; %s", sig,
                        summary.get("step"), preemption["requeue"])
        summary["preemption"] = preemption
    return summary


def train_task(config: str, overrides: Sequence[str], run_id: str | None = None, nproc: int = 1) -> dict:
    """Train on this rank (or, ``nproc > 1`` outside Slurm, on N local MPI ranks); the run summary."""
    overrides = with_run_id(overrides, run_id or job_run_id())
    if nproc > 1:
        rc = launch_local(nproc, ["train", config, *overrides])
        cfg = load_config(config, overrides)
        if rc != 0:
            raise RuntimeError(f"hpc train on {nproc} local ranks exited {rc}")
        return read_json(Path(cfg.out_dir) / cfg.name / str(cfg.run_id) / "summary.json")
    summary = run_training(config, overrides)
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


def infer_argv(cfg: InferConfig) -> list[str]:
    """The ``hpc infer`` arguments that run ``cfg``: what each rank runs when this process starts
    the ranks itself (``launch_local``, ``srun``)."""
    argv = ["infer", "--model", cfg.model, "--input", cfg.input, "--output", cfg.output,
            "--format", cfg.format, "--batch-size", str(cfg.batch_size), "--top-k", str(cfg.top_k),
            "--device", cfg.device]
    for flag, value in (("--combine", cfg.combine), ("--registry", cfg.registry)):
        if value is not None:
            argv += [flag, value]
    argv += [f for f, on in (("--allow-unpromoted", cfg.allow_unpromoted), ("--overwrite", cfg.overwrite),
                                  ("--allow-nonfinite", cfg.allow_nonfinite)) if on]
    return argv


def infer_task(cfg: InferConfig, nproc: int = 1) -> dict:
    """Score ``cfg`` on this rank (a Slurm task of a job of several: the ranks are the tasks), or,
    ``nproc > 1`` in a job of one task (Slurm, ``--local``), on N MPI ranks it starts here; the
    rank's summary (rank 0's holds the output manifest). A failure fails the job."""
    progress_interval_s()  # checked alike on every rank before starting: only rank 0 reports progress
    # In a Slurm task, launch_local's environment keeps mpiexec's ranks on this node (PRTE_MCA_ras=^slurm,
    # hpc.dist.spawn.launch_env): Open MPI would otherwise launch them through Slurm onto the job's nodes.
    if nproc > 1 and world_from_env().size == 1:
        rc = launch_local(nproc, infer_argv(cfg))
        if rc != 0:
            raise RuntimeError(f"hpc infer on {nproc} local ranks exited {rc}")
        return {"state": "done", "manifest": read_json(Path(cfg.output) / MANIFEST)}
    return run_infer(cfg, progress=True)


def register_task(run_dir: str, name: str, alias: str, source: str = "best", root: str | None = None) -> str:
    """Pipeline stage 2: register the trained run and point ``alias`` at it; returns NAME@VERSION."""
    reg = Registry(root)
    version = reg.add(run_dir, name, source=source)
    reg.promote(name, version, alias)
    return f"{name}@{version}"
