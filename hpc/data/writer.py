"""Write a split as checksummed HDF5 shards, chunk by chunk, with constant memory.

A ``ShardWriter`` takes batches (dict field -> array ``[n, *shape]``), drops or rejects rows with
NaN/Inf, appends them to the current shard (one resizable dataset per field, chunked along the
sample axis), and publishes each full shard atomically (temporary name, fsync, rename). Stats,
class counts and id ranges are accumulated on the way; ``close()`` writes the manifest last, so an
interrupted run never leaves a manifest pointing at a partial file. Memory: one incoming batch
plus HDF5's chunk buffers, whatever the size of the data set.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from hpc.data.manifest import (MANIFEST_NAME, TASK_FIELDS, FieldSpec, Manifest, ShardInfo,
                               write_manifest)
from hpc.data.normalize import RunningStats
from hpc.util.io import atomic_path, sha256_file
from hpc.util.versions import code_version, command_line, versions

COMPRESSIONS = ("none", "gzip", "lzf")
BAD_ROW_POLICIES = ("drop", "error")
CHUNK_BYTES = 1 << 20  # HDF5 chunk target: big enough for fast sequential reads, small for caching


@dataclass(frozen=True)
class WriterConfig:
    samples_per_shard: int = 65536
    compression: str = "none"
    on_bad_rows: str = "drop"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard {self.samples_per_shard}: must be >= 1")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"--compression {self.compression!r}: valid are {', '.join(COMPRESSIONS)}")
        if self.on_bad_rows not in BAD_ROW_POLICIES:
            raise ValueError(f"--on-bad-rows {self.on_bad_rows!r}: valid are {', '.join(BAD_ROW_POLICIES)}")


def block_rows(fields: Mapping[str, FieldSpec]) -> int:
    """Rows per HDF5 chunk, the same for every field (sized by the widest field, ~1 MB): the reader
    reads blocks of exactly these rows, so a compressed chunk is never decompressed twice."""
    widest = max(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in fields.values())
    return max(1, CHUNK_BYTES // max(widest, 1))


def bad_row_mask(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """True for rows holding a NaN or Inf in any float field."""
    n = len(next(iter(batch.values())))
    bad = np.zeros(n, bool)
    for arr in batch.values():
        if arr.dtype.kind == "f":
            bad |= ~np.isfinite(arr.reshape(n, -1)).all(axis=1)
    return bad


def provenance(source: str, seed: int | None, extra: Mapping[str, Any] | None = None) -> dict:
    out = {"source": source, "seed": seed, "command": command_line(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
           "code_version": code_version()}
    out.update(extra or {})
    return out



class Accounts:
    """What the manifest records about the rows: stats, class counts, id ranges (one streaming pass)."""

    def __init__(self, task: str, fields: Mapping[str, FieldSpec], num_classes: int | None = None,
                 num_users: int | None = None, num_items: int | None = None):
        self.task = task
        self.stats = {k: RunningStats(s.shape) for k, s in fields.items() if np.dtype(s.dtype).kind == "f"}
        self.class_counts = np.zeros(0, np.int64)
        self.max_id = {"user": -1, "item": -1}
        self.given = {"num_classes": num_classes, "num_users": num_users, "num_items": num_items}

    def update(self, batch: Mapping[str, np.ndarray]) -> None:
        for k, st in self.stats.items():
            st.update(batch[k])
        if self.task == "classification" and len(batch["y"]):
            y = np.asarray(batch["y"]).astype(np.int64, copy=False)
            if y.min() < 0:
                raise ValueError(f"labels must be >= 0 (class indices); found {int(y.min())}")
            counts = np.bincount(y)
            if len(counts) > len(self.class_counts):
                self.class_counts = np.pad(self.class_counts, (0, len(counts) - len(self.class_counts)))
            self.class_counts[:len(counts)] += counts
        if self.task == "ratings":
            for k in ("user", "item"):
                if len(batch[k]):
                    if batch[k].min() < 0:
                        raise ValueError(f"field {k!r}: ids must be >= 0; found {int(batch[k].min())}")
                    self.max_id[k] = max(self.max_id[k], int(batch[k].max()))

    def fill(self, m: Manifest) -> None:
        if self.task == "classification":
            k = max(self.given["num_classes"] or 0, len(self.class_counts))
            m.num_classes = int(k)
            m.class_counts = np.pad(self.class_counts, (0, k - len(self.class_counts))).tolist()
        if self.task == "ratings":
            m.num_users = int(max(self.given["num_users"] or 0, self.max_id["user"] + 1))
            m.num_items = int(max(self.given["num_items"] or 0, self.max_id["item"] + 1))
        m.stats = {k: st.result() for k, st in self.stats.items()}


class ShardWriter:
    def __init__(self, split_dir: str | os.PathLike, task: str, fields: Mapping[str, FieldSpec],
                 config: WriterConfig = WriterConfig(), num_classes: int | None = None,
                 num_users: int | None = None, num_items: int | None = None):
        self.dir = Path(split_dir)
        self.task, self.cfg = task, config
        self.fields = dict(fields)
        missing = set(TASK_FIELDS[task]) - set(self.fields)
        if missing:
            raise ValueError(f"task {task} needs fields {sorted(missing)}; got {sorted(self.fields)}")
        self._prepare_dir()
        self.shards: list[ShardInfo] = []
        self.accounts = Accounts(task, self.fields, num_classes=num_classes, num_users=num_users,
                                 num_items=num_items)
        self.dropped = 0
        self.rows_seen = 0
        self._stack = contextlib.ExitStack()
        self._h5: h5py.File | None = None
        self._n = 0  # rows in the open shard

    def _prepare_dir(self) -> None:
        mpath = self.dir / MANIFEST_NAME
        old = sorted(self.dir.glob("shard-*.h5")) if self.dir.is_dir() else []
        if (mpath.exists() or old) and not self.cfg.overwrite:
            raise ValueError(f"{self.dir}: already holds a data set ({MANIFEST_NAME} or shards); "
                             "pass --overwrite to replace it")
        # Remove the manifest first: a crash after this point leaves no manifest, never a stale one.
        with contextlib.suppress(FileNotFoundError):
            mpath.unlink()
        for f in old + (sorted(self.dir.glob(".shard-*.tmp")) if self.dir.is_dir() else []):
            f.unlink()  # with the old shards go temporaries a killed writer left behind
        self.dir.mkdir(parents=True, exist_ok=True)

    # -- writing ---------------------------------------------------------------------------
    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        batch = {k: np.asarray(batch[k]) for k in self.fields}
        n = len(batch[next(iter(self.fields))])
        for k, spec in self.fields.items():
            if batch[k].shape != (n,) + spec.shape:
                raise ValueError(f"field {k!r}: batch has shape {batch[k].shape}, expected "
                                 f"({n}, {', '.join(map(str, spec.shape))})")
        start_row = self.rows_seen
        self.rows_seen += n
        cast = {k: v.astype(self.fields[k].dtype, copy=False) for k, v in batch.items()}
        # NaN/Inf in the source, or made by the cast (a float64 beyond float32's range becomes Inf).
        bad = bad_row_mask(batch) | bad_row_mask(cast)
        batch = cast
        if bad.any():
            if self.cfg.on_bad_rows == "error":
                rows = (np.flatnonzero(bad)[:5] + start_row).tolist()
                raise ValueError(f"{int(bad.sum())} row(s) with NaN/Inf (source rows {rows}...); "
                                 "fix the source or pass --on-bad-rows drop")
            self.dropped += int(bad.sum())
            batch = {k: v[~bad] for k, v in batch.items()}
            n = int((~bad).sum())
        self.accounts.update(batch)
        pos = 0
        while pos < n:
            if self._h5 is None:
                self._open_shard()
            take = min(n - pos, self.cfg.samples_per_shard - self._n)
            for k in self.fields:
                ds = self._h5[k]
                ds.resize(self._n + take, axis=0)
                ds[self._n:self._n + take] = batch[k][pos:pos + take]
            self._n += take
            pos += take
            if self._n == self.cfg.samples_per_shard:
                self._close_shard()

    def _open_shard(self) -> None:
        name = f"shard-{len(self.shards):05d}.h5"
        self._tmp = self._stack.enter_context(atomic_path(self.dir / name))
        self._name = name
        self._h5 = h5py.File(self._tmp, "w")
        comp = None if self.cfg.compression == "none" else self.cfg.compression
        for k, spec in self.fields.items():
            self._h5.create_dataset(k, shape=(0,) + spec.shape, maxshape=(None,) + spec.shape,
                                    dtype=spec.dtype, chunks=(min(block_rows(self.fields), self.cfg.samples_per_shard),) + spec.shape,
                                    compression=comp)
        self._n = 0

    def _close_shard(self) -> None:
        assert self._h5 is not None
        self._h5.close()
        self._h5 = None
        # Checksum the temporary file: the rename below publishes exactly these bytes.
        info = ShardInfo(self._name, self._n, os.path.getsize(self._tmp), sha256_file(self._tmp),
                         {k: "/" + k for k in self.fields})
        self._stack.close()  # fsync + rename into place
        self._stack = contextlib.ExitStack()
        self.shards.append(info)

    def end_shard(self) -> None:
        """Publish the current shard now, even if not full (e.g. one shard per source file)."""
        if self._h5 is not None and self._n:
            self._close_shard()

    def abort(self) -> None:
        """Drop the partial shard (its temporary file is removed); no manifest is written."""
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def close(self, provenance: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Manifest:
        if self._h5 is not None and self._n:
            self._close_shard()
        elif self._h5 is not None:
            self.abort()
        m = Manifest(task=self.task, fields=self.fields, shards=self.shards, path=self.dir)
        self.accounts.fill(m)
        m.bad_rows = {"policy": self.cfg.on_bad_rows, "dropped": self.dropped, "seen": self.rows_seen}
        m.provenance = dict(provenance or {})
        m.provenance.update(extra or {})
        write_manifest(self.dir, m)
        return m

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
