"""What the trainer reads: the HDF5 splits through ``hpc.data.StreamingReader`` (``load_data``),
or readers a test or benchmark injects (``Data``).

Where the splits are (``split_dirs``): ``data.train|val|test`` where given (any split directory),
else ``data.dir/<split>``. For regression the training targets' mean and std go into the schema
(``schema["target"]``): the model learns in standardized units and predicts in the target's own
(``hpc.models.regression``), and the registry's card keeps them with the schema.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from hpc.data import StreamingReader, load_manifest
from hpc.data.manifest import MANIFEST_NAME
from hpc.data.normalize import input_stats
from hpc.data.rowhooks import apply_targets, targets_fn, weight_fn
from hpc.train.checks import per_rank_batch
from hpc.train.config import DataConfig, TrainConfig

log = logging.getLogger("hpc.train")
TARGET = {"classification": "y", "regression": "y", "ratings": "rating"}
SPLITS = ("train", "val", "test")


def _no_split(p: Path) -> str:
    """Why ``p`` is not a split directory, and what to set instead."""
    where = f"no manifest {p / MANIFEST_NAME}"
    if not p.exists():
        return f"{where}: {p} does not exist"
    inner = sorted(d.parent.name for d in p.glob(f"*/{MANIFEST_NAME}")) if p.is_dir() else []
    hint = (f"; it holds the splits {', '.join(inner)}: set data.dir={p}, or data.<split> to one of "
            f"{', '.join(str(p / s) for s in inner)}") if inner else ""
    return f"{where}: {p} is not a split directory (write one with `hpc data shard|synth|index`){hint}"


def split_dirs(d: DataConfig) -> dict[str, Path]:
    """``{split: directory}`` of the splits there are: ``data.<split>`` where given (it must be a
    split directory: ValueError naming the key otherwise), else ``data.dir/<split>`` when that
    exists. ``train`` is required; ``val`` and ``test`` are optional."""
    out = {}
    for split in SPLITS:
        given = getattr(d, split)
        if given:
            p = Path(given)
            if not (p / MANIFEST_NAME).is_file():
                raise ValueError(f"config.data.{split}: {_no_split(p)}")
            out[split] = p
        elif d.dir and (Path(d.dir) / split / MANIFEST_NAME).is_file():
            out[split] = Path(d.dir) / split
    if "train" not in out:
        root = Path(d.dir or "")
        if (root / MANIFEST_NAME).is_file():
            raise ValueError(f"config.data.dir: {root} is a split directory itself (it has {MANIFEST_NAME}), "
                             f"not a directory of splits: set data.train={root} instead")
        raise ValueError(f"config.data.dir: no training split: {_no_split(root / 'train')}; or set "
                         "data.train to the training split directory")
    return out


def target_stats(manifest, targets_from: str | None = None) -> dict:
    """``{"mean", "std"}`` of the training targets: the manifest's statistics of ``y``, or of the
    per-row override targets (``data.targets_from``)."""
    if targets_from:
        y = np.load(targets_from, mmap_mode="r")
        return {"mean": float(np.mean(y, dtype=np.float64)), "std": float(np.std(y, dtype=np.float64))}
    st = manifest.stats.get(TARGET[manifest.task]) or {}
    mean, std = st.get("mean"), st.get("std")
    if mean is None or std is None:
        return {}
    return {"mean": float(np.mean(mean)), "std": float(np.mean(std))}


class TargetsReader:
    """The training reader with each batch's targets replaced by the row's override
    (``data.targets_from``: boosting rounds on residuals)."""

    def __init__(self, reader, fn, field: str):
        self._reader, self._fn, self._field = reader, fn, field

    def __getattr__(self, name):  # set_epoch, batches_per_epoch, state_dict, manifest, ...
        return getattr(self._reader, name)

    def __iter__(self):
        for batch in self._reader:
            yield apply_targets(batch, self._fn, self._field)


@dataclasses.dataclass
class Data:
    """What the trainer needs from the data layer (``load_data``) or from a test/benchmark."""
    schema: dict
    train: object                      # reader: set_epoch, __iter__, batches_per_epoch, state_dict
    val: object | None = None
    test: object | None = None
    info: dict = dataclasses.field(default_factory=dict)   # summary["data"]


def load_data(cfg: TrainConfig, rank: int, world_size: int) -> Data:
    d = cfg.data
    dirs = split_dirs(d)
    per_rank = per_rank_batch(d.batch_size, world_size)
    manifest = load_manifest(dirs["train"])
    schema = manifest.schema()
    if manifest.task == "regression":
        stats = target_stats(manifest, d.targets_from)
        if stats and all(math.isfinite(v) for v in stats.values()):
            schema["target"] = stats
    mean = (manifest.stats.get("rating") or {}).get("mean")
    if mean is not None:
        schema["rating_mean"] = float(np.mean(mean))
    eval_per_rank = max(1, (d.eval_batch_size or d.batch_size) // world_size)
    common = dict(rank=rank, world_size=world_size, seed=cfg.seed, normalize=d.normalize,
                  prefetch=d.prefetch, shuffle_buffer_mb=d.shuffle_buffer_mb)
    hook = {}
    if d.sample_weights is not None:
        hook["weight_fn"] = weight_fn(d.sample_weights, manifest.total_samples)
    train = StreamingReader(dirs["train"], batch_size=per_rank, shuffle=d.shuffle,
                            remainder=d.remainder, augment=d.augment, **hook, **common)
    if d.targets_from:
        train = TargetsReader(train, targets_fn(d.targets_from, manifest.total_samples),
                               TARGET[manifest.task])
        if "rating_mean" in schema:
            schema["rating_mean"] = float(np.load(d.targets_from, mmap_mode="r").mean())
    if train.batches_per_epoch < cfg.train.grad_accum:
        raise ValueError(f"{dirs['train']}: {manifest.total_samples} samples give {train.batches_per_epoch} "
                         f"batches of {d.batch_size} per epoch, fewer than train.grad_accum="
                         f"{cfg.train.grad_accum}; lower data.batch_size")
    # Evaluation normalizes with the *training* split's statistics, exactly as the registered
    # model does at inference; a split's own statistics would shift its inputs slightly.
    eval_common = dict(common, normalize=input_stats(schema, manifest.stats) if d.normalize else False)
    splits = {split: StreamingReader(dirs[split], batch_size=eval_per_rank, shuffle=False, remainder="pad",
                                     **eval_common) for split in ("val", "test") if split in dirs}
    if "val" not in splits and rank == 0:
        log.warning("no validation split: best model = last (set data.val to a split directory%s)",
                    f", or add {Path(d.dir) / 'val'}" if d.dir else "")
    info = {"dir": str(Path(d.dir or dirs["train"]).resolve()),
            "splits": {k: str(p.resolve()) for k, p in dirs.items()},
            "manifest_sha256": manifest.sha256, "schema": schema,
            "stats": manifest.stats, "samples": {"train": manifest.total_samples,
                                                 **{k: r.manifest.total_samples for k, r in splits.items()}}}
    return Data(schema, train, splits.get("val"), splits.get("test"), info)
