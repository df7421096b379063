"""`hpc ensemble submit`: members as one Slurm job array (or an afterok chain), then the combiner.

- bagging: K members, one array task each; stacking: L level-0 models x F folds, one array task
  each. Boosting: K rounds as K single jobs, each ``afterok`` on the previous round.
- the combiner job (``afterok`` on the array / the last round) runs ``hpc ensemble train``'s
  whole driver (``driver.Runner``): every member is registered by then, so it only predicts the training split where
  it must (boosting weights, stacking out-of-fold table), fits the meta-model, evaluates and
  registers the ensemble.

Each member task trains with a fixed run id (``ens-<config hash>``) and ``resume=auto``: a job
preempted or stopped at its time limit checkpoints and is requeued by the trainer
(``hpc.train.preempt``, as ``hpc submit train``), and the requeued task resumes the same run.
Rerunning the submission submits the same jobs, whose tasks find their members registered and
return at once. With ``--nodes``/``--tasks-per-node`` each member trains on that many ranks
(srun ``--mpi=pmix`` for the MPI backend); rank 0 registers it.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from hpc.dist.world import world_from_env
from hpc.ensemble.driver import Runner
from hpc.ensemble.spec import load_spec
from hpc.launch.sbatch import render_sbatch
from hpc.launch.submit import LOG_DIR, Submitted, _python, check_with_slurm, make_executor, run_jobs
from hpc.registry import Registry


def _runner(spec_path: str, overrides: Sequence[str], registry_root: str, log=print, rank: int = 0,
            nproc: int = 1) -> Runner:
    spec = load_spec(spec_path)
    spec.overrides = list(spec.overrides) + list(overrides)
    return Runner(spec, Registry(registry_root), nproc=nproc, log=log, rank=rank)


def member_task(spec_path: str, overrides: Sequence[str], registry_root: str, index: int,
                nproc: int = 1) -> str | None:
    """Array task / chain link ``index``, run once per Slurm task (rank): every rank trains the
    member, rank 0 registers it and returns NAME@VERSION (the other ranks return None).
    ``nproc`` > 1 (``--local``): this one process trains the member on N local MPI ranks."""
    rank = world_from_env().rank
    return _runner(spec_path, overrides, registry_root, log=print if rank == 0 else (lambda s: None),
                   rank=rank, nproc=nproc).train_task(index)


def combine_task(spec_path: str, overrides: Sequence[str], registry_root: str) -> dict:
    """The last job: evaluate, fit the meta-model (stacking) and register the ensemble."""
    res = _runner(spec_path, overrides, registry_root).run()
    return {"state": "completed", "ensemble": res.ensemble_ref, "members": [m.ref for m in res.members],
            "metrics": res.metrics, "run_dir": str(res.work_dir)}


def submit_ensemble(spec_path: str, overrides: Sequence[str], res, mode: str = "slurm",
                    dry_run: bool = False, registry_root: str | None = None):
    """Submit the members and the combiner; returns ``Submitted`` (or the scripts for --dry-run)."""
    spec_path = str(Path(spec_path).resolve())
    root = str(Path(registry_root or os.environ.get("HPC_REGISTRY") or "registry").resolve())
    runner = _runner(spec_path, overrides, root, log=lambda s: None)  # validates spec and base config
    res.check()
    if res.name == "hpc":
        res.name = runner.spec.name
    # each member task runs on res.ntasks ranks, as `hpc submit train` does (srun --mpi=pmix for MPI)
    res.mpi = runner.base_config.dist.backend in ("auto", "mpi", "horovod")
    folder = (runner.work / LOG_DIR / "%j").resolve()
    n_parallel = runner.parallel_tasks()
    small = replace(res, nodes=1, tasks_per_node=1, gpus_per_node=0, mpi=False, name=f"{res.name}-combine")
    args = (spec_path, list(overrides), root)
    nproc = res.ntasks if mode == "local" else 1
    if dry_run:
        if n_parallel:
            parts = [("members (job array)", res, n_parallel)]
        else:
            parts = [(f"round {k}", replace(res, dependency="afterok:<round %d>" % (k - 1)) if k else res, None)
                     for k in range(runner.spec.boosting.rounds)]
        parts.append(("combine", replace(small, dependency="afterok:<members>"), None))
        return "\n".join(f"# ---- {name}\n" + render_sbatch(r, folder, _python(), array_size=size)
                         for name, r, size in parts)
    if mode == "slurm":
        check_with_slurm(render_sbatch(res, folder, _python(), array_size=n_parallel))
    jobs, stages = [], []
    if n_parallel:
        jobs = run_jobs(make_executor(mode, folder, res), mode,
                        [(member_task, (*args, i, nproc)) for i in range(n_parallel)])
        stages = [f"member {i}" for i in range(n_parallel)]
        after = str(jobs[0].job_id).split("_")[0]  # afterok on the array id: every task succeeded
    else:
        after = None
        for k in range(runner.spec.boosting.rounds):
            r = replace(res, dependency=f"afterok:{after}") if after and mode == "slurm" else res
            [job] = run_jobs(make_executor(mode, folder, r), mode, [(member_task, (*args, k, nproc))])
            if mode != "slurm":
                job.result()  # local/debug executors know no dependencies: run the chain in order
            jobs.append(job)
            stages.append(f"round {k}")
            after = str(job.job_id)
    if mode != "slurm":
        for job in jobs:
            job.result()  # raises the member's error: no combiner after a failed member
    small = replace(small, dependency=f"afterok:{after}") if mode == "slurm" else small
    [combine] = run_jobs(make_executor(mode, folder, small), mode, [(combine_task, args)])
    jobs.append(combine)
    stages.append("combine")
    return Submitted("ensemble", mode, jobs, [runner.work.resolve()] * len(jobs), stages)
