"""What the trainer reads: the HDF5 splits through ``hpc.data.StreamingReader`` (``load_data``),
or readers a test or benchmark injects (``Data``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from hpc.data import StreamingReader, load_manifest
from hpc.data.normalize import input_stats
from hpc.data.rowhooks import apply_targets, targets_fn, weight_fn
from hpc.train.checks import per_rank_batch
from hpc.train.config import TrainConfig

TARGET = {"classification": "y", "regression": "y", "ratings": "rating"}


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
    root = Path(d.dir)
    per_rank = per_rank_batch(d.batch_size, world_size)
    manifest = load_manifest(root / "train")
    schema = manifest.schema()
    mean = (manifest.stats.get("rating") or {}).get("mean")
    if mean is not None:
        schema["rating_mean"] = float(np.mean(mean))
    eval_per_rank = max(1, (d.eval_batch_size or d.batch_size) // world_size)
    common = dict(rank=rank, world_size=world_size, seed=cfg.seed, normalize=d.normalize,
                  prefetch=d.prefetch, shuffle_buffer_mb=d.shuffle_buffer_mb)
    hook = {}
    if d.sample_weights is not None:
        hook["weight_fn"] = weight_fn(d.sample_weights, manifest.total_samples)
    train = StreamingReader(root / "train", batch_size=per_rank, shuffle=d.shuffle,
                            remainder=d.remainder, augment=d.augment, **hook, **common)
    if d.targets_from:
        train = TargetsReader(train, targets_fn(d.targets_from, manifest.total_samples),
                               TARGET[manifest.task])
        if "rating_mean" in schema:
            schema["rating_mean"] = float(np.load(d.targets_from, mmap_mode="r").mean())
    if train.batches_per_epoch < cfg.train.grad_accum:
        raise ValueError(f"{root / 'train'}: {manifest.total_samples} samples give {train.batches_per_epoch} "
                         f"batches of {d.batch_size} per epoch, fewer than train.grad_accum="
                         f"{cfg.train.grad_accum}; lower data.batch_size")
    # Evaluation normalizes with the *training* split's statistics, exactly as the registered
    # model does at inference; a split's own statistics would shift its inputs slightly.
    eval_common = dict(common, normalize=input_stats(schema, manifest.stats) if d.normalize else False)
    splits = {}
    for split in ("val", "test"):
        if (root / split / "manifest.json").is_file():
            splits[split] = StreamingReader(root / split, batch_size=eval_per_rank, shuffle=False,
                                            remainder="pad", **eval_common)
    info = {"dir": str(root.resolve()), "manifest_sha256": manifest.sha256, "schema": schema,
            "stats": manifest.stats, "samples": {"train": manifest.total_samples,
                                                 **{k: r.manifest.total_samples for k, r in splits.items()}}}
    return Data(schema, train, splits.get("val"), splits.get("test"), info)
