"""Set up the world and the communicator around one ``Trainer``, and fail loudly on any rank."""

from __future__ import annotations

import logging
import sys
import traceback

from hpc.train.config import AllRanksError, TrainConfig, load_config

log = logging.getLogger("hpc.train")


def run(config, overrides=(), data=None) -> dict:
    cfg = config if isinstance(config, TrainConfig) and not overrides else load_config(config, overrides)
    from hpc.dist.comm import init_comm
    from hpc.dist.world import world_from_env

    world = world_from_env()
    if data is None:
        preflight(cfg, world.size)  # user errors: ValueError on every rank alike, before any collective
    comm = init_comm(cfg.dist.backend, world, timeout_s=cfg.dist.timeout_s)
    trainer = None
    try:
        from hpc.train.trainer import Trainer

        trainer = Trainer(cfg, comm, data)
        return trainer.fit()
    except BaseException as e:
        if comm.size > 1 and not isinstance(e, (SystemExit, AllRanksError)):
            # The other ranks are (or soon will be) blocked in a collective: abort the whole job,
            # naming this rank, rather than leaving them to hang until the walltime.
            msg = (f"hpc train: rank {comm.rank}/{comm.size} on {world.hostname} failed: "
                   f"{type(e).__name__}: {e}; aborting all ranks")
            tb = traceback.format_exc()
            with _suppress():
                log.error("%s\n%s", msg, tb)
            sys.stderr.write(tb + msg + "\n")
            sys.stderr.flush()
            comm.abort(1)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        comm.close()


def preflight(cfg: TrainConfig, world_size: int) -> None:
    """Check what would otherwise fail after the ranks started: the data and the model's fit to it."""
    from pathlib import Path

    from hpc.data import load_manifest
    from hpc.models.families import build_model, task_of

    import torch

    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if cfg.data.batch_size % world_size:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} (the global batch) is not divisible by "
                         f"{world_size} ranks; use a multiple of {world_size}")
    manifest = load_manifest(Path(cfg.data.dir) / "train")
    task = task_of(cfg.model.family)
    if manifest.task != task:
        raise ValueError(f"model.family={cfg.model.family!r} is a {task} model but {cfg.data.dir} holds "
                         f"{manifest.task} data")
    build_model(cfg.model.family, cfg.model.config, manifest.schema())


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True
