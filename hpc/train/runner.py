"""One run on this rank: the world, the communicator and the run directory around one ``Trainer``;
then the summary (``summary.json``), the registration, and a loud failure on any rank.

What comes after a preemption (a Slurm requeue) is the launcher's business, not this module's:
``hpc.launch.tasks.run_training`` wraps ``run``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from hpc.data import load_manifest
from hpc.data.integrity import check_split
from hpc.dist.backends import init_comm
from hpc.dist.spawn import launch_marks
from hpc.dist.world import world_from_env
from hpc.models import ops
from hpc.models.families import build_model, task_of
from hpc.registry import Registry, default_root
from hpc.train.checks import check_precision, per_rank_batch
from hpc.train.config import AllRanksError, TrainConfig, dump_yaml, load_config
from hpc.train.inputs import Data, split_dirs
from hpc.train.metrics import samples_per_s
from hpc.train.rundir import agree_run_dir, close_logging, setup_logging
from hpc.train.state import Outcome
from hpc.train.trainer import Trainer, startup_phases
from hpc.util.io import atomic_write_json, atomic_write_text
from hpc.util.versions import code_version, versions

log = logging.getLogger("hpc.train")


def run(config, overrides=(), data: Data | None = None,
        on_hang: Callable[[object], None] | None = None) -> dict:
    # Start-up marks (time.time()) up to the first step: summary.json "startup" (trainer.startup_phases).
    marks = {**launch_marks(), "entered": time.time()}
    cfg = config if isinstance(config, TrainConfig) and not overrides else load_config(config, overrides)
    world = world_from_env()
    if data is None:
        preflight(cfg, world.size)  # user errors: ValueError on every rank alike, before any collective
    marks["preflight"] = time.time()
    comm = init_comm(cfg.dist.backend, world, timeout_s=cfg.dist.timeout_s)
    marks["comm"] = time.time()
    trainer, handlers = None, []
    try:
        started = time.time()
        run_dir, resume_from = agree_run_dir(cfg, comm)
        handlers = setup_logging(comm.rank, run_dir)
        # Every rank's own log says where it runs; summary.json gets everyone's (one small collective).
        log.info("rank %d/%d on %s; backend %s", comm.rank, comm.size, comm.world.placement(), comm.backend)
        placement = comm.allgather_object(placement_of(comm.world))
        if comm.rank == 0:
            (run_dir / "models").mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        marks["rundir"] = time.time()
        trainer = Trainer(cfg, comm, run_dir, resume_from, data, on_hang=on_hang, started=started,
                          startup=marks)
        outcome = trainer.fit()
        refuse_nonfinite(trainer, outcome)
        summary = summarize(trainer, outcome, placement)
        if comm.rank == 0:
            publish(trainer, summary)
        return summary
    except BaseException as e:
        if comm.size > 1 and not isinstance(e, (SystemExit, AllRanksError)):
            # The other ranks are (or soon will be) blocked in a collective: abort the whole job,
            # naming this rank, rather than leaving them to hang until the walltime.
            msg = (f"hpc train: rank {comm.rank}/{comm.size} on {world.node_name} failed: "
                   f"{type(e).__name__}: {e}; aborting all ranks")
            tb = traceback.format_exc()
            with contextlib.suppress(Exception):
                log.error("%s\n%s", msg, tb)
            sys.stderr.write(tb + msg + "\n")
            sys.stderr.flush()
            comm.abort(1)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        close_logging(handlers)
        comm.close()


STEP_SPLIT = ("step", "samples", "data", "fwd_bwd", "grad_sync", "flags", "optim")


def preflight(cfg: TrainConfig, world_size: int) -> None:
    """Check what would otherwise fail after the ranks started: the data and the model's fit to it."""
    check_precision(cfg.train.precision, cuda=torch.cuda.is_available())
    per_rank_batch(cfg.data.batch_size, world_size)
    train_dir = split_dirs(cfg.data)["train"]  # every named split exists (ValueError naming the key)
    manifest = load_manifest(train_dir)
    check_labels(split_dirs(cfg.data), manifest)
    for d in split_dirs(cfg.data).values():  # shard paths, duplicates, symlinks, row counts (no hashing)
        check_split(manifest if d == train_dir else load_manifest(d))
    try:
        task_of(cfg.model.family, manifest.task)
    except ValueError as e:
        raise ValueError(f"{e} ({train_dir})") from None
    build_model(cfg.model.family, cfg.model.config, manifest.schema())


def check_labels(dirs: dict[str, Path], train) -> None:
    """Every split has labels, and no evaluation split has a class the model would have no output
    for (it would fail after training); ValueError naming the split."""
    for split, d in dirs.items():
        m = train if split == "train" else load_manifest(d)
        if not m.labeled:
            raise ValueError(f"{d}: an unlabeled split (data.{split}; sharded without --label or indexed "
                             "without --y): nothing to train or evaluate on. `hpc infer` scores it; shard "
                             "labeled rows (--label COL) for training")
        if split != "train" and (m.num_classes or 0) > (train.num_classes or 0) and train.num_classes:
            raise ValueError(f"{d}: has {m.num_classes} classes but the training split {dirs['train']} "
                             f"{train.num_classes}, so the model would have no output for the others; "
                             "shard the splits together, or state the classes (--num-classes N / --labels)")


def nonfinite_metric(t: Trainer, outcome: Outcome) -> str | None:
    """The first non-finite metric of the final or best validation or of the test, named; or None."""
    s = t.state
    evals = [("final val", s.last_val), ("best val", s.best.get("metrics") or {}), ("test", outcome.test)]
    for what, metrics in evals:
        for k, v in metrics.items():
            if isinstance(v, float) and not math.isfinite(v):
                return f"{what} {k} = {v}"
    if t.data.val is not None and s.best["step"] is None and s.last_val_step >= 0:
        return f"val {t.cfg.train.monitor}: no validation was finite"  # e.g. a resume after the last one
    return None


def refuse_nonfinite(t: Trainer, outcome: Outcome) -> None:
    """A completed run whose evaluation is not finite fails: no registration, exit status 1."""
    if outcome.state != "completed":
        return
    bad = nonfinite_metric(t, outcome)
    if bad is not None:
        outcome.state = "failed"
        outcome.reason = (f"non-finite evaluation at step {t.state.step}: {bad}; the model is not "
                          "registered (lower optim.lr, set optim.clip_grad_norm, or check the data)")
        log.error("%s", outcome.reason)


def placement_of(world) -> dict:
    """Where this rank runs (gathered from every rank into summary.json's ``placement``)."""
    return {"node": world.node_name, "node_rank": world.node_rank, "local_rank": world.local_rank,
            "local_size": world.local_size}


def summarize(t: Trainer, outcome: Outcome, placement: list[dict] | None = None) -> dict:
    """The run summary (``summary.json``; docs/DESIGN.md "Run directory") from the trainer's end state.

    ``placement``: every rank's ``placement_of`` in rank order; ``nodes`` lists the nodes the ranks
    ran on, in node-rank order."""
    cfg, s, w = t.cfg, t.state, t.comm.world
    placement = placement or [placement_of(w)]
    nodes = sorted({(p["node_rank"], p["node"]) for p in placement})
    step_t = max(t.timers["step"], 1e-9)
    summary = {
        "state": outcome.state, "reason": outcome.reason, "run_dir": str(t.run_dir), "name": cfg.name,
        "model": {"family": t.family, "task": t.task, "config": cfg.model.config,
                  "parameters": sum(p.numel() for p in t.model.parameters())},
        "data": t.data.info, "metrics": {"val": s.best.get("metrics") or {}, "test": outcome.test},
        "best": {"step": s.best["step"], "monitor": cfg.train.monitor, "value": s.best["value"]},
        "step": s.step, "epoch": s.epoch, "total_steps": t.total_steps,
        "world_size": t.world, "backend": t.comm.backend, "device": str(t.device),
        "nodes": [n for _, n in nodes], "num_nodes": w.num_nodes,
        "placement": [dict(p, rank=r) for r, p in enumerate(placement)],
        "kernels": ops.kernels_in_use(t.device),
        "optimizer": {"name": cfg.optim.name, "fused": cfg.optim.fused,
                      "step": getattr(t.opt, "kernel_path", "torch.optim")},
        "precision": cfg.train.precision,
        "samples_per_s": samples_per_s(t.timers["samples"], t.timers["step"]),
        "time_fractions": {"data_wait": t.timers["data"] / step_t, "comm_wait": t.timers["comm"] / step_t},
        # This rank's seconds in training steps split by phase, the same for the first step alone
        # (reader start-up, first-call costs), and the start-up: hpc bench train prints them.
        "step_split_s": {k: t.timers[k] for k in STEP_SPLIT},
        "first_step_split_s": {k: t.timers_first.get(k, 0.0) for k in STEP_SPLIT},
        "startup": startup_phases(t.startup),
        "wall_s": time.time() - t.t_start, "config_hash": cfg.hash(),
        "versions": versions(), "code_version": code_version(),
        "slurm": {"job_id": w.slurm_job_id, "array_task_id": w.slurm_array_task_id,
                  "restart_count": w.slurm_restart_count, "nodelist": list(w.slurm_nodelist)},
    }
    if outcome.state == "preempted":
        # What a launcher needs to requeue: which signal, and how long the checkpoint took
        # (compared with Slurm's warning lead time).
        summary["preemption"] = {"signal": outcome.signal, "checkpoint_s": t.last_ckpt_s}
    return summary


def publish(t: Trainer, summary: dict) -> None:
    """Rank 0: write ``summary.json``, register a completed run (``registry:``), end the sinks."""
    atomic_write_json(t.run_dir / "summary.json", summary)
    if summary["state"] == "completed" and t.cfg.registry is not None:
        summary["registry"] = register(t.cfg, t.run_dir)
        atomic_write_json(t.run_dir / "summary.json", summary)
    t.metrics_log.close(summary)  # TensorBoard/MLflow: the final state, then drained
    reason = summary["reason"]
    log.info("run %s at step %d%s; summary: %s", summary["state"], summary["step"],
             f" ({reason})" if reason else "", t.run_dir / "summary.json")


def register(cfg: TrainConfig, run_dir: Path) -> dict:
    r = cfg.registry
    reg = Registry(r.root or default_root())
    version = reg.add(run_dir, r.name, source=r.source)
    if r.alias:
        reg.promote(r.name, version, r.alias)
    log.info("registered %s version %s%s", r.name, version, f" as @{r.alias}" if r.alias else "")
    return {"name": r.name, "version": version, "alias": r.alias}
