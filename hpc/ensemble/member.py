"""One ensemble member's training run: the base config + overrides + the per-row hook.

The hook (``hpc.data.rowhooks``: per-row loss weights, per-row targets) reaches the trainer as
the config keys ``data.sample_weights`` / ``data.targets_from``, so a member trains on any
number of ranks and ``hpc train BASE <the same overrides>`` alone reproduces it.
"""

from __future__ import annotations

import json
from pathlib import Path

from hpc.dist.spawn import launch_local
from hpc.launch.tasks import run_training
from hpc.train.config import load_config
from hpc.util.io import read_json


def hook_overrides(hook: dict) -> list[str]:
    """The member's row hook as trainer overrides."""
    return [f"data.sample_weights={json.dumps(hook['sample_weights'])}",
            f"data.targets_from={json.dumps(hook['targets_from'])}"]


def train_member(base: str, overrides: list[str], hook: dict, nproc: int = 1) -> dict | None:
    """Train one member in this process (``nproc`` 1) or on ``nproc`` local MPI ranks; returns the
    run's summary."""
    ov = list(overrides) + hook_overrides(hook)
    if nproc <= 1:
        return run_training(base, ov)  # under Slurm, a preempted member's job is requeued
    rc = launch_local(nproc, ["train", base, *ov])
    if rc != 0:
        raise RuntimeError(f"member training on {nproc} ranks exited {rc}")
    cfg = load_config(base, ov)
    return read_json(Path(cfg.out_dir) / cfg.name / str(cfg.run_id) / "summary.json")
