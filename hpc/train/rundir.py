"""The run directory (docs/DESIGN.md "Run directory"): where it is, per-rank logs, metrics.jsonl.

``runs/<name>/<id>/``: ``config.yaml``, ``metrics.jsonl``, ``logs/rank-R.log``, ``checkpoints/``,
``models/{best,last}.safetensors``, ``summary.json``. Rank 0 decides the directory and broadcasts
it, so every rank agrees even when the id is a timestamp.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from hpc.train.config import AllRanksError, TrainConfig
from hpc.util.io import atomic_write_text, read_json

log = logging.getLogger("hpc.train")


def default_run_id(world) -> str:
    if world.slurm_job_id:  # stable across requeues, so resume=auto finds its checkpoints
        task = f"_{world.slurm_array_task_id}" if world.slurm_array_task_id is not None else ""
        return f"slurm-{world.slurm_job_id}{task}"
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"


def _unfinished_runs(base: Path) -> list[Path]:
    """Run directories with a checkpoint that did not complete, newest first."""
    out = []
    for d in base.iterdir() if base.is_dir() else []:
        if not (d / "checkpoints" / "latest").is_file():
            continue
        try:
            state = read_json(d / "summary.json").get("state")
        except ValueError:
            state = None
        if state != "completed":
            out.append(d)
    return sorted(out, key=lambda d: (d / "checkpoints" / "latest").stat().st_mtime, reverse=True)


def resolve_run_dir(cfg: TrainConfig, world) -> tuple[Path, Path | None]:
    """(run directory, explicit checkpoint to resume or None). Called on rank 0 only.

    resume=never: a new directory (``run_id`` or a default id). resume=auto: ``run_id`` (or the
    Slurm job's id) when given; otherwise the newest unfinished run of this name, else a new one.
    resume=PATH: a checkpoint directory (``.../checkpoints/step-N``) or a run directory.
    """
    base = Path(cfg.out_dir) / cfg.name
    if cfg.resume not in ("never", "auto"):
        p = Path(cfg.resume)
        if (p / "meta.json").is_file():
            return p.resolve().parents[1], p.resolve()
        if (p / "checkpoints").is_dir():
            return p.resolve(), None
        raise ValueError(f"resume={cfg.resume!r}: not a checkpoint directory (with meta.json) nor a "
                         "run directory (with checkpoints/); valid: never, auto, or such a path")
    if cfg.run_id or world.slurm_job_id or cfg.resume == "never":
        run_dir = base / (cfg.run_id or default_run_id(world))
        if cfg.resume == "never" and (run_dir / "checkpoints").exists():
            raise ValueError(f"run directory {run_dir} already has checkpoints; pass resume=auto to "
                             "continue it or choose another run_id")
        return run_dir.resolve(), None
    runs = _unfinished_runs(base)
    return (runs[0] if runs else base / default_run_id(world)).resolve(), None


def agree_run_dir(cfg: TrainConfig, comm) -> tuple[Path, Path | None]:
    """Collective: rank 0 resolves the run directory and every rank gets the same answer (or
    the same error, so all of them stop alike)."""
    where = None
    if comm.rank == 0:
        try:
            run_dir, explicit = resolve_run_dir(cfg, comm.world)
            where = (str(run_dir), explicit and str(explicit))
        except ValueError as e:
            where = str(e)
    where = comm.broadcast_object(where)
    if isinstance(where, str):
        raise AllRanksError(where)
    run_dir, explicit = where
    return Path(run_dir), Path(explicit) if explicit else None


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__(f"%(asctime)s rank {rank} %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(rank: int, run_dir: Path | None) -> list[logging.Handler]:
    """Rank 0 logs INFO to stderr, other ranks WARNING and up; every rank INFO to its log file."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [stream]
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "logs" / f"rank-{rank}.log"))
        handlers[-1].setLevel(logging.INFO)
    for h in handlers:
        h.setFormatter(_RankFormatter(rank))
        log.addHandler(h)
    return handlers


def close_logging(handlers: list[logging.Handler]) -> None:
    for h in handlers:
        log.removeHandler(h)
        h.close()


@contextlib.contextmanager
def run_logging(rank: int, run_dir: str | Path | None):
    """The run's log (stderr and ``logs/rank-R.log``) reopened after the trainer closed it: for
    what the launch layer says about a finished run (e.g. the requeue after a preemption)."""
    handlers = setup_logging(rank, Path(run_dir) if run_dir else None)
    try:
        yield log
    finally:
        close_logging(handlers)


class MetricsLog:
    """``metrics.jsonl`` (rank 0 appends; a resume first drops lines past the resumed step).

    ``sinks`` (``hpc.train.sinks.Sinks``, rank 0's TensorBoard/MLflow copies) get every record too:
    every metric already passes here, so no call site needs to know about them.
    """

    def __init__(self, path: Path, enabled: bool, sinks=None):
        self.path, self.enabled, self.sinks = path, enabled, sinks

    def truncate_after(self, step: int) -> None:
        if self.sinks is not None:
            self.sinks.resumed(step)
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def write(self, **record) -> None:
        if self.enabled:
            record.setdefault("time", round(time.time(), 3))
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")
            if self.sinks is not None:
                self.sinks.write(record)

    def close(self, summary: dict | None = None) -> None:
        """End the sinks with the run's summary (None: the run failed without one); the first call counts."""
        sinks, self.sinks = self.sinks, None
        if sinks is not None:
            sinks.close(summary)
