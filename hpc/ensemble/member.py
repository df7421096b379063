"""One ensemble member's training run: the base config + overrides + the per-row hook.

The hook (``hpc.ensemble.hooks``: per-row loss weights, per-row targets) reaches the trainer in
one of two ways. When the trainer's config has ``data.sample_weights``/``data.targets_from``,
they are passed as overrides (any number of ranks; ``hpc train`` alone reproduces the member).
Otherwise they are injected into the in-process training reader through the trainer's public
``hpc.train.run(config, data=...)`` (``StreamingReader(weight_fn=...)`` + a target-replacing
wrapper), which limits weighted members to one process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TARGET_FIELD = {"classification": "y", "regression": "y", "ratings": "rating"}


def trainer_takes_hook() -> bool:
    """Does this trainer read ``data.sample_weights`` / ``data.targets_from`` from its config?"""
    import dataclasses

    from hpc.train.config import DataConfig

    return {"sample_weights", "targets_from"} <= {f.name for f in dataclasses.fields(DataConfig)}


class TargetsReader:
    """The training reader with each batch's targets replaced by the row's override."""

    def __init__(self, reader, fn, field: str):
        self._reader, self._fn, self._field = reader, fn, field

    def __getattr__(self, name):  # set_epoch, batches_per_epoch, state_dict, manifest, ...
        return getattr(self._reader, name)

    def __iter__(self):
        from hpc.ensemble.hooks import apply_targets

        for batch in self._reader:
            yield apply_targets(batch, self._fn, self._field)


def train_member(base: str, overrides: list[str], hook: dict, nproc: int = 1) -> dict | None:
    """One member's training run: the base config, its overrides, and the row hook.

    When the trainer's config has the hook keys, they go in as overrides (any number of ranks,
    and ``hpc train`` alone can reproduce the member). Otherwise the hook is injected into the
    in-process training reader through ``hpc.train.run(..., data=)``, on one process.
    """
    import json

    from hpc.train import run

    if trainer_takes_hook() or not any(hook.values()):
        ov = list(overrides)
        if trainer_takes_hook():
            ov += [f"data.sample_weights={json.dumps(hook['sample_weights'])}",
                   f"data.targets_from={json.dumps(hook['targets_from'])}"]
        if nproc <= 1:
            return run(base, ov)
        from hpc.dist.launch import launch_local
        from hpc.train.config import load_config
        from hpc.util.io import read_json

        rc = launch_local(nproc, ["train", base, *ov])
        if rc != 0:
            raise RuntimeError(f"member training on {nproc} ranks exited {rc}")
        cfg = load_config(base, ov)
        return read_json(Path(cfg.out_dir) / cfg.name / str(cfg.run_id) / "summary.json")
    if nproc > 1:
        raise ValueError(f"--nproc {nproc}: this trainer has no data.sample_weights/data.targets_from "
                         "config keys, so weighted members can only train in-process; use --nproc 1 "
                         "(or bagging.bootstrap: false)")
    from hpc.ensemble.hooks import targets_fn, weight_fn
    from hpc.train.config import load_config
    from hpc.train.trainer import load_data

    cfg = load_config(base, overrides)
    data = load_data(cfg, 0, 1)
    n = data.train.manifest.total_samples
    data.train.weight_fn = weight_fn(hook["sample_weights"], n)
    if hook["targets_from"]:
        data.train = TargetsReader(data.train, targets_fn(hook["targets_from"], n),
                                    TARGET_FIELD[data.train.manifest.task])
        if "rating_mean" in data.schema:
            # MF starts its global offset at the targets' mean: for residuals that is ~0, not the
            # ratings' mean (a 3-star offset the short residual rounds would spend their steps on).
            data.schema["rating_mean"] = float(np.load(hook["targets_from"], mmap_mode="r").mean())
    return run(cfg, (), data)
