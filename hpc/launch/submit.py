"""`hpc submit train|infer|sweep|pipeline`: submission through submitit's AutoExecutor.

Modes: ``slurm`` (one Slurm task per rank), ``local`` (submitit's LocalExecutor: one process that
starts N local MPI ranks with mpiexec when more than one is asked for), ``debug`` (DebugExecutor:
in this process, one rank, for pdb).

Everything that can be refused at submit time is refused here, before anything is queued: the
config is validated locally, and the rendered script goes through ``sbatch --test-only`` so an
unknown partition or an impossible request fails now with Slurm's own message and what to change.

Layout: the run directory is ``<out_dir>/<name>/slurm-<job id>/`` and submitit's logs are its
``submitit/`` folder (``%j`` in the folder is the job id; array members get ``<array>_<index>``).
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit

from hpc.infer.job import InferConfig, check_output
from hpc.infer.output import lock_holder
from hpc.launch import slurm
from hpc.launch.sbatch import SlurmResources, render_sbatch, slurm_parameters
from hpc.launch.sweep import expand_grid, point_overrides, write_sweep
from hpc.launch.tasks import infer_task, register_task, train_task
from hpc.registry import Registry, default_root
from hpc.train.config import load_config, resolve_path

MODES = ("slurm", "local", "debug")
LOG_DIR = "submitit"


@dataclass
class Submitted:
    """What was submitted (one entry per job), for printing and for the job index."""

    kind: str
    mode: str
    jobs: list[Any] = field(default_factory=list)      # submitit Job objects
    run_dirs: list[Path] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)    # pipeline stage names, else kind

    @property
    def job_ids(self) -> list[str]:
        return [str(j.job_id) for j in self.jobs]

    def describe(self) -> str:
        lines = []
        for stage, job, run_dir in zip(self.stages, self.jobs, self.run_dirs):
            try:
                state = job.state if self.mode == "slurm" else "SUBMITTED"
            except Exception:  # noqa: BLE001 - a transient squeue failure must not hide the job id
                state = "UNKNOWN"
            lines.append(f"{stage}: job {job.job_id} ({state})")
            lines.append(f"  run dir: {run_dir}")
            lines.append(f"  logs:    {job.paths.stdout}")
            lines.append(f"           {job.paths.stderr}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------- validation
def _partition_hint() -> str:
    try:
        out = slurm.run(["sinfo", "-h", "-o", "%P|%D|%c|%m|%G|%l"]).stdout
    except slurm.SlurmError:
        return ""
    rows = []
    for line in out.splitlines():
        p, nodes, cpus, mem, gres, limit = (line.split("|") + [""] * 6)[:6]
        rows.append(f"  {p}: {nodes} node(s), {cpus} CPUs and {mem} MB each, gres {gres}, time limit {limit}")
    return "available (sinfo):\n" + "\n".join(rows) if rows else ""


def check_with_slurm(script: str) -> str:
    """``sbatch --test-only`` on the script; Slurm's refusal becomes a SlurmError with a hint."""
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(script)
    try:
        proc = slurm.run(["sbatch", "--test-only", f.name], check=False, timeout=60)
    finally:
        os.unlink(f.name)
    if proc.returncode == 0:
        return (proc.stderr or proc.stdout).strip()
    msg = (proc.stderr or proc.stdout).strip()
    low = msg.lower()
    if "partition" in low:
        what = "choose a partition that exists with --partition (or leave it out for the default)"
    elif "account" in low or "qos" in low or "association" in low:
        what = "check --account/--qos against `sacctmgr show assoc user=$USER`"
    elif "time limit" in low:
        what = "lower --time to the partition's limit"
    else:
        what = "ask for what the nodes have: --nodes, --tasks-per-node x --cpus-per-task, --mem, --gpus-per-node"
    hint = _partition_hint()
    raise slurm.SlurmError(f"Slurm refused the job before submission:\n{msg}\nwhat to change: {what}"
                           + (f"\n{hint}" if hint else ""))


# ------------------------------------------------------------------------------- executors
def make_executor(mode: str, folder: str | Path, res: SlurmResources):
    """A submitit AutoExecutor for ``mode`` with ``res`` applied."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "slurm":
        slurm.require("sbatch")
        slurm.install_submitit_watcher()
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        ex.update_parameters(**{f"slurm_{k}": v for k, v in slurm_parameters(res).items()})
        # Submit held, released by run_jobs() once the log folders exist: with `%j` in the folder
        # submitit creates it only after sbatch returns, and an idle cluster may start the job
        # (whose stdout lives there) before that. On the sbatch command line, not in the script,
        # so --dry-run shows the script a plain-sbatch user can submit as it is.
        ex._executor._make_submission_command = lambda path: ["sbatch", "--hold", str(path)]
        return ex
    if mode == "debug" and res.ntasks > 1:
        raise ValueError(f"--debug runs in this process as one rank (for pdb), not {res.ntasks}: "
                         "drop --nodes/--tasks-per-node, or use --local for several local ranks")
    ex = submitit.AutoExecutor(folder=folder, cluster=mode)
    # Local jobs: UNLIMITED is a year (submitit's local executor needs a number).
    ex.update_parameters(timeout_min=res.minutes or 525600, name=res.name)
    return ex


def run_jobs(ex, mode: str, calls: Sequence[tuple[Callable, tuple]]) -> list:
    """Submit ``fn(*args)`` for each call (several: one job array); under Slurm create the log
    folders, then release the held jobs."""
    if len(calls) == 1:
        jobs = [ex.submit(calls[0][0], *calls[0][1])]
    else:
        with ex.batch():
            jobs = [ex.submit(fn, *args) for fn, args in calls]
    if mode == "slurm":
        for job in jobs:
            job.paths.folder.mkdir(parents=True, exist_ok=True)
        slurm.run(["scontrol", "release", *sorted({str(j.job_id).split("_")[0] for j in jobs})])
    return jobs


def _python() -> str:
    return shlex.quote(sys.executable)


def _local_run_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


# ------------------------------------------------------------------------------- train
def _load_train_config(config: str, overrides: Sequence[str]):
    """(validated config, absolute config path, overrides with resume=auto added).

    A submitted run must be able to resume after a requeue, so ``resume=never`` (the default)
    becomes ``resume=auto``; the run directory of a new job is new, so its first start is fresh.
    """
    cfg = load_config(config, overrides)  # ValueError names the file and key: exit 2, nothing queued
    overrides = list(overrides)
    if cfg.resume == "never":
        overrides.append("resume=auto")
        cfg = load_config(config, overrides)
    return cfg, str(resolve_path(config).resolve()), overrides


def train_layout(cfg, mode: str, kind: str = "train") -> tuple[Path, str | None]:
    """(run dir with ``%j`` under Slurm, run_id to pin or None to let the job use its job id)."""
    base = Path(cfg.out_dir).resolve() / cfg.name
    if cfg.run_id:
        return base / cfg.run_id, cfg.run_id
    if mode == "slurm":
        return base / "slurm-%j", None
    rid = _local_run_id(kind)
    return base / rid, rid


def submit_train(config: str, overrides: Sequence[str], res: SlurmResources, mode: str = "slurm",
                 dry_run: bool = False) -> Submitted | str:
    cfg, config_path, overrides = _load_train_config(config, overrides)
    res.check()
    if res.name == "hpc":
        res.name = cfg.name
    res.mpi = cfg.dist.backend in ("auto", "mpi", "horovod")
    run_dir, rid = train_layout(cfg, mode)
    folder = run_dir / LOG_DIR
    if dry_run:
        return render_sbatch(res, folder, _python())
    if mode == "slurm":
        check_with_slurm(render_sbatch(res, folder, _python()))
    ex = make_executor(mode, folder, res)
    nproc = res.ntasks if mode == "local" else 1
    [job] = run_jobs(ex, mode, [(train_task, (config_path, list(overrides), rid, nproc))])
    return Submitted("train", mode, [job], [_concrete(run_dir, job)], ["train"])


def _concrete(path: Path, job) -> Path:
    return Path(str(path).replace("%j", str(job.job_id)))


# ------------------------------------------------------------------------------- infer
def submit_infer(cfg: InferConfig, res: SlurmResources, mode: str = "slurm", dry_run: bool = False,
                 dependency: str | None = None, nproc: int = 1) -> Submitted | str:
    """The inference job ``cfg`` (``infer_task``); logs go to ``<output>.submitit-%j`` beside the output.

    The ranks are the job's Slurm tasks (``res.nodes`` x ``res.tasks_per_node``, srun
    ``--mpi=pmix``), on one node or several, as for training; or, ``nproc > 1``, a job of ONE task
    starts N local MPI ranks (``hpc infer --nproc``). ``--local`` starts ``res.ntasks`` local ranks."""
    res.check()
    if nproc > 1 and res.ntasks > 1:
        raise ValueError(f"--infer-arg=--nproc {nproc} with --nodes {res.nodes} --tasks-per-node "
                         f"{res.tasks_per_node}: give one or the other (--nodes/--tasks-per-node run one "
                         "Slurm task per rank, across nodes; --nproc starts N local ranks inside one task)")
    if mode == "local" and res.ntasks > 1:
        nproc = res.ntasks  # LocalExecutor runs one process: it starts the ranks with mpiexec
    _validate_infer(cfg, nproc)
    # The ranks only meet at the start and the end, so without this the survivors of a lost rank or
    # node would score all their shards before failing; stopped at once, the rerun resumes sooner.
    res.kill_on_bad_exit = True
    if res.name == "hpc":
        res.name = "infer"
    res.dependency = dependency or res.dependency
    out = Path(cfg.output).resolve()
    folder = out.parent / f"{out.name}.{LOG_DIR}-%j"
    if dry_run:
        return render_sbatch(res, folder, _python())
    if mode == "slurm":
        check_with_slurm(render_sbatch(res, folder, _python()))
    [job] = run_jobs(make_executor(mode, folder, res), mode, [(infer_task, (cfg, nproc))])
    return Submitted("infer", mode, [job], [out], ["infer"])


def _validate_infer(cfg: InferConfig, nproc: int = 1) -> None:
    """What the job would refuse, refused now (``InferConfig`` checked its own values): the model
    references (resolved in the registry), the input split, an ``--output`` that is a file or that
    a running job writes (its ``_LOCK``)."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: must be >= 1")
    check_output(cfg.output)
    holder = lock_holder(cfg.output)
    if holder is not None:
        raise ValueError(f"--output {cfg.output}: another hpc infer is writing this directory ({holder}); "
                         "wait for it (a rerun resumes a finished or failed one), or choose another --output")
    reg = Registry(cfg.registry)
    for ref in cfg.refs:
        reg.resolve(ref)
    if not (Path(cfg.input) / "manifest.json").is_file():
        raise ValueError(f"--input {cfg.input}: no manifest.json there; give a split directory written by "
                         "`hpc data` (e.g. data/digits/test)")


def submit_function(fn: Callable, args: Sequence[Any], res: SlurmResources, folder: Path,
                    mode: str = "slurm"):
    """Submit any picklable ``fn(*args)`` with ``res`` (validated by sbatch --test-only first)."""
    res.check()
    if mode == "slurm":
        check_with_slurm(render_sbatch(res, folder, _python()))
    return run_jobs(make_executor(mode, folder, res), mode, [(fn, tuple(args))])[0]


# ------------------------------------------------------------------------------- sweep
def submit_sweep(config: str, overrides: Sequence[str], grid: Sequence[str], res: SlurmResources,
                 mode: str = "slurm", dry_run: bool = False) -> tuple[Submitted, Path] | str:
    """One job array, one member per grid point; writes ``sweep-<array id>/sweep.json``."""
    points = expand_grid(grid)
    if any(k == "dist.backend" or k == "dist" for k in points[0]):
        raise ValueError("--grid dist.backend: all members of an array share one sbatch script (srun "
                         "--mpi=pmix or not); submit one sweep per backend instead")
    cfg, config_path, overrides = _load_train_config(config, overrides)
    if cfg.run_id:
        raise ValueError(f"run_id={cfg.run_id!r}: leave run_id unset for a sweep (each member gets its own)")
    for p in points:  # every member's config must be valid before anything is queued
        load_config(config, [*overrides, *point_overrides(p)])
    res.check()
    if res.name == "hpc":
        res.name = f"{cfg.name}-sweep"
    res.mpi = cfg.dist.backend in ("auto", "mpi", "horovod")
    base = Path(cfg.out_dir).resolve() / cfg.name
    if mode == "slurm":
        run_dirs_pattern, rids = base / "slurm-%j", [None] * len(points)
    else:
        local = _local_run_id("sweep")
        run_dirs_pattern, rids = base / f"{local}-%j", [f"{local}-{i}" for i in range(len(points))]
    folder = run_dirs_pattern / LOG_DIR
    if dry_run:
        return render_sbatch(res, folder, _python(), array_size=len(points))
    if mode == "slurm":
        check_with_slurm(render_sbatch(res, folder, _python(), array_size=len(points)))
    nproc = res.ntasks if mode == "local" else 1
    jobs = []
    if mode == "slurm":
        jobs = run_jobs(make_executor(mode, folder, res), mode,
                        [(train_task, (config_path, [*overrides, *point_overrides(p)], rid, nproc))
                         for p, rid in zip(points, rids)])
        run_dirs = [_concrete(run_dirs_pattern, j) for j in jobs]
        sweep_id = str(jobs[0].job_id).split("_")[0]
    else:
        run_dirs = [base / rid for rid in rids]
        for p, rid, rd in zip(points, rids, run_dirs):
            jobs += run_jobs(make_executor(mode, rd / LOG_DIR, res), mode,
                             [(train_task, (config_path, [*overrides, *point_overrides(p)], rid, nproc))])
        sweep_id = local
    members = [{"index": i, "params": p, "job_id": str(j.job_id), "run_dir": str(rd)}
               for i, (p, j, rd) in enumerate(zip(points, jobs, run_dirs))]
    sweep_dir = base / f"sweep-{sweep_id}"
    write_sweep(sweep_dir, config_path, overrides, members)
    return Submitted("sweep", mode, jobs, run_dirs, [f"member {i}" for i in range(len(jobs))]), sweep_dir


# ------------------------------------------------------------------------------- pipeline
def submit_pipeline(config: str, overrides: Sequence[str], res: SlurmResources, infer_input: str,
                    infer_output: str, alias: str = "staging", infer_tasks: int | None = None,
                    dry_run: bool = False) -> Submitted | str:
    """train -> register -> infer as three Slurm jobs chained with afterok."""
    cfg, config_path, overrides = _load_train_config(config, overrides)
    if cfg.registry is None or not cfg.registry.name:
        raise ValueError("hpc submit pipeline registers the trained model: set registry.name in the config "
                         "or pass the override registry.name=NAME")
    if not Path(infer_input).is_dir():
        raise ValueError(f"--infer-input {infer_input}: not a directory (a data directory made by `hpc data`)")
    reg = cfg.registry
    alias = reg.alias or alias
    reg_root = str(Path(reg.root or default_root()).resolve())
    # The register stage is its own job: the training job must not register too.
    train_overrides = [*overrides, "registry=null"]
    res.check()
    if res.name == "hpc":
        res.name = cfg.name
    res.mpi = cfg.dist.backend in ("auto", "mpi", "horovod")
    run_dir, _ = train_layout(cfg, "slurm")
    small = replace(res, nodes=1, tasks_per_node=1, gpus_per_node=0, mpi=False, name=f"{res.name}-register",
                    time="0:30:00" if res.minutes is None or res.minutes > 30 else res.time)
    infer_res = replace(res, nodes=1, tasks_per_node=infer_tasks or res.tasks_per_node, name=f"{res.name}-infer",
                        kill_on_bad_exit=True)
    out = Path(infer_output).resolve()
    infer_folder = out.parent / f"{out.name}.{LOG_DIR}-%j"
    # Resolved when the stage runs, after the register stage has pointed the alias at the new version.
    infer_cfg = InferConfig(model=f"{reg.name}@{alias}", input=str(Path(infer_input).resolve()), output=str(out),
                            registry=reg_root)
    if dry_run:
        parts = [("train", res, run_dir / LOG_DIR), ("register", replace(small, dependency="afterok:<train>"), None),
                 ("infer", replace(infer_res, dependency="afterok:<register>"), infer_folder)]
        return "\n".join(f"# ---- stage {name}\n" + render_sbatch(r, folder or run_dir / LOG_DIR, _python())
                         for name, r, folder in parts)
    check_with_slurm(render_sbatch(res, run_dir / LOG_DIR, _python()))
    check_with_slurm(render_sbatch(infer_res, infer_folder, _python()))
    [train_job] = run_jobs(make_executor("slurm", run_dir / LOG_DIR, res), "slurm",
                           [(train_task, (config_path, train_overrides))])
    concrete = _concrete(run_dir, train_job)
    small.dependency = f"afterok:{train_job.job_id}"
    [reg_job] = run_jobs(make_executor("slurm", concrete / LOG_DIR, small), "slurm",
                         [(register_task, (str(concrete), reg.name, alias, reg.source, reg_root))])
    infer_res.dependency = f"afterok:{reg_job.job_id}"
    [infer_job] = run_jobs(make_executor("slurm", infer_folder, infer_res), "slurm", [(infer_task, (infer_cfg,))])
    return Submitted("pipeline", "slurm", [train_job, reg_job, infer_job], [concrete, concrete, out],
                     ["train", "register", "infer"])
