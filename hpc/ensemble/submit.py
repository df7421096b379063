"""`hpc ensemble submit`: members as one Slurm job array (or an afterok chain), then the combiner.

- bagging: K members, one array task each; stacking: L level-0 models x F folds, one array task
  each. Boosting: K rounds as K single jobs, each ``afterok`` on the previous round.
- the combiner job (``afterok`` on the array / the last round) runs ``hpc ensemble train``'s
  whole runner: every member is registered by then, so it only predicts the training split where
  it must (boosting weights, stacking out-of-fold table), fits the meta-model, evaluates and
  registers the ensemble.

Each member task trains with a fixed run id (``ens-<config hash>``) and ``resume=auto``: a job
preempted or stopped at its time limit checkpoints and is requeued by the trainer
(``hpc.train.preempt``, as ``hpc submit train``), and the requeued task resumes the same run.
Rerunning the submission submits the same jobs, whose tasks find their members registered and
return at once. Members run on one Slurm task each (see ``_check_layout``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from hpc.ensemble.member import trainer_takes_hook
from hpc.ensemble.runner import Runner
from hpc.ensemble.spec import load_spec


def _runner(spec_path: str, overrides: Sequence[str], registry_root: str, log=print) -> Runner:
    from hpc.registry import Registry

    spec = load_spec(spec_path)
    spec.overrides = list(spec.overrides) + list(overrides)
    return Runner(spec, Registry(registry_root), log=log)


def member_task(spec_path: str, overrides: Sequence[str], registry_root: str, index: int) -> str:
    """Array task / chain link ``index``: train and register that member; returns NAME@VERSION."""
    return _runner(spec_path, overrides, registry_root).train_task(index)


def combine_task(spec_path: str, overrides: Sequence[str], registry_root: str) -> dict:
    """The last job: evaluate, fit the meta-model (stacking) and register the ensemble."""
    res = _runner(spec_path, overrides, registry_root).run()
    return {"state": "completed", "ensemble": res.ensemble_ref, "members": [m.ref for m in res.members],
            "metrics": res.metrics, "run_dir": str(res.work_dir)}


def _check_layout(res) -> None:
    if res.ntasks > 1 and not trainer_takes_hook():
        raise ValueError(f"--nodes x --tasks-per-node = {res.ntasks}: ensemble members run on one Slurm "
                         "task each until the trainer reads data.sample_weights/data.targets_from from "
                         "its config (docs/ensembles.md); drop --nodes/--tasks-per-node")
    if res.ntasks > 1:
        raise ValueError(f"--nodes x --tasks-per-node = {res.ntasks}: multi-rank members are not wired "
                         "into the ensemble tasks yet (registration must happen on rank 0 only); use 1")


def submit_ensemble(spec_path: str, overrides: Sequence[str], res, mode: str = "slurm",
                    dry_run: bool = False, registry_root: str | None = None):
    """Submit the members and the combiner; returns ``Submitted`` (or the scripts for --dry-run)."""
    import os

    from hpc.launch.sbatch import render_sbatch
    from hpc.launch.submit import LOG_DIR, Submitted, _python, check_with_slurm, make_executor, run_jobs

    spec_path = str(Path(spec_path).resolve())
    root = str(Path(registry_root or os.environ.get("HPC_REGISTRY") or "registry").resolve())
    runner = _runner(spec_path, overrides, root, log=lambda s: None)  # validates spec and base config
    res.check()
    _check_layout(res)
    if res.name == "hpc":
        res.name = runner.spec.name
    res.mpi = False  # one rank per member task (see _check_layout)
    folder = (runner.work / LOG_DIR / "%j").resolve()
    n_parallel = runner.parallel_tasks()
    small = replace(res, gpus_per_node=0, name=f"{res.name}-combine")
    args = (spec_path, list(overrides), root)
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
                        [(member_task, (*args, i)) for i in range(n_parallel)])
        stages = [f"member {i}" for i in range(n_parallel)]
        after = str(jobs[0].job_id).split("_")[0]  # afterok on the array id: every task succeeded
    else:
        after = None
        for k in range(runner.spec.boosting.rounds):
            r = replace(res, dependency=f"afterok:{after}") if after and mode == "slurm" else res
            [job] = run_jobs(make_executor(mode, folder, r), mode, [(member_task, (*args, k))])
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
