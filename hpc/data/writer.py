"""Write a split as checksummed HDF5 shards, chunk by chunk, with constant memory.

A ``ShardWriter`` takes batches (dict field -> array ``[n, *shape]``), drops or rejects rows with
NaN/Inf, stores the features in ``--store-dtype`` (uint8 ... float32, bfloat16; integer dtypes only
for values that fit exactly), appends them to the current shard (one resizable dataset per field,
chunked along the sample axis), and publishes each full shard atomically (temporary name, fsync,
rename). Stats, class counts and id ranges are accumulated on the way; ``close()`` writes the
manifest last, so an interrupted run never leaves a manifest pointing at a partial file; a run
stopped by bad input (a ValueError naming the source, field, rows and values) removes what it
wrote, directories included. Memory: one incoming batch plus HDF5's chunk buffers, whatever the
size of the data set.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from hpc.data.manifest import (COMPACT_DTYPES, ENCODINGS, MANIFEST_NAME, TASK_FIELDS, FieldSpec, Manifest,
                               ShardInfo, float_fields, write_manifest)
from hpc.data.normalize import RunningStats
from hpc.data.shardio import to_float32
from hpc.util.io import atomic_path, sha256_file
from hpc.util.versions import code_version, command_line, versions

COMPRESSIONS = ("none", "gzip", "lzf")
BAD_ROW_POLICIES = ("drop", "error")
STORE_DTYPES = COMPACT_DTYPES + ("bfloat16", "float32")
SHOW = 3  # positions named in an error message
_MADE_DIRS: set[str] = set()  # directories created by this process's writers (see ShardWriter.abort)
CHUNK_BYTES = 1 << 20  # HDF5 chunk target: big enough for fast sequential reads, small for caching


@dataclass(frozen=True)
class WriterConfig:
    samples_per_shard: int = 65536
    compression: str = "none"
    on_bad_rows: str = "drop"
    overwrite: bool = False
    store_dtype: str | None = None  # the features' (x) dtype on disk; None: what the source declares (float32)

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard {self.samples_per_shard}: must be >= 1")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"--compression {self.compression!r}: valid are {', '.join(COMPRESSIONS)}")
        if self.on_bad_rows not in BAD_ROW_POLICIES:
            raise ValueError(f"--on-bad-rows {self.on_bad_rows!r}: valid are {', '.join(BAD_ROW_POLICIES)}")
        if self.store_dtype is not None and self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"--store-dtype {self.store_dtype!r}: valid are {', '.join(STORE_DTYPES)}")


def stored_spec(spec: FieldSpec, store_dtype: str | None) -> FieldSpec:
    """The spec of a float field stored as ``store_dtype`` (bfloat16: uint16 bits + encoding)."""
    if store_dtype is None:
        return spec
    if store_dtype in ENCODINGS:
        return FieldSpec(ENCODINGS[store_dtype], spec.shape, store_dtype)
    return FieldSpec(store_dtype, spec.shape)


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), rounded to nearest even through float32 (as torch
    does); NaN stays NaN. Values beyond bfloat16's range become +-Inf (the caller refuses them)."""
    f = np.asarray(x, np.float32)
    u = f.view(np.uint32).astype(np.uint32)
    u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    u >>= np.uint32(16)
    u[np.isnan(f)] = 0x7FC0
    return u.astype(np.uint16)


def positions(values: np.ndarray, bad: np.ndarray, rows: np.ndarray, limit: int = SHOW,
              names: Sequence[str] | None = None) -> list[str]:
    """``row R [i, j] = v`` for the first ``limit`` True elements of ``bad`` (same shape as
    ``values``, whose axis 0 is rows numbered by ``rows``). ``names``: column names of 1-D samples
    (a CSV's feature columns), used instead of ``[j]``."""
    flat = np.flatnonzero(bad.reshape(-1))[:limit]
    per = int(np.prod(values.shape[1:], dtype=np.int64)) or 1
    out = []
    for e in flat.tolist():
        r, inner = divmod(e, per)
        v = values.reshape(-1)[e]
        if values.ndim == 1:
            at = ""
        elif names is not None and values.ndim == 2:
            at = f" column {names[inner]!r}"
        else:
            at = f" {[int(i) for i in np.unravel_index(inner, values.shape[1:])]}"
        out.append(f"row {int(rows[r])}{at} = {v.item()!r}")
    return out


def block_rows(fields: Mapping[str, FieldSpec]) -> int:
    """Rows per HDF5 chunk, the same for every field (sized by the widest field, ~1 MB): the reader
    reads blocks of exactly these rows, so a compressed chunk is never decompressed twice."""
    widest = max(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in fields.values())
    return max(1, CHUNK_BYTES // max(widest, 1))


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
        self.specs = dict(fields)
        self.stats = {k: RunningStats(fields[k].shape) for k in float_fields(task, fields)}
        self.class_counts = np.zeros(0, np.int64)
        self.max_id = {"user": -1, "item": -1}
        self.given = {"num_classes": num_classes, "num_users": num_users, "num_items": num_items}

    def update(self, batch: Mapping[str, np.ndarray]) -> None:
        for k, st in self.stats.items():  # of the stored values, as readers yield them
            st.update(to_float32(batch[k], self.specs[k]) if self.specs[k].encoding else batch[k])
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
    """``source``/``names`` are what error messages call the input and its fields (e.g. ``d.npz``,
    ``{"x": "images"}``; a sequence of column names for a 1-D field); ``add``'s ``rows`` are the
    rows' numbers in the source (default: counted from 0 in the order added)."""

    def __init__(self, split_dir: str | os.PathLike, task: str, fields: Mapping[str, FieldSpec],
                 config: WriterConfig = WriterConfig(), num_classes: int | None = None,
                 num_users: int | None = None, num_items: int | None = None, source: str = "",
                 names: Mapping[str, str | Sequence[str]] | None = None):
        self.dir = Path(split_dir)
        self.task, self.cfg = task, config
        self.fields = dict(fields)
        self.source, self.names = source, dict(names or {})
        missing = set(TASK_FIELDS.get(task, {})) - set(self.fields)  # task None: an unlabeled split
        if missing:
            raise ValueError(f"task {task} needs fields {sorted(missing)}; got {sorted(self.fields)}")
        if config.store_dtype is not None:
            if "x" not in self.fields:
                raise ValueError(f"--store-dtype {config.store_dtype}: it sets the dtype of the features "
                                 f"'x'; task {task} has none (fields {sorted(self.fields)})")
            self.fields["x"] = stored_spec(self.fields["x"], config.store_dtype)
        self.floats = float_fields(task, self.fields)
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
        # Directories writers create are removed again, when empty, if they are aborted.
        _MADE_DIRS.update(str(d) for d in (self.dir, *self.dir.parents) if not d.exists())
        self.dir.mkdir(parents=True, exist_ok=True)

    # -- checking --------------------------------------------------------------------------
    def _label(self, k: str) -> str:
        name = self.names.get(k, k)
        return name if isinstance(name, str) else k

    def _where(self, k: str) -> str:
        return f"{self.source}:{self._label(k)}" if self.source else f"field {self._label(k)!r}"

    def _nonfinite(self, k: str, v: np.ndarray) -> np.ndarray:
        """Elements that are NaN/Inf, or (a float field stored as float32) beyond float32's range."""
        if v.dtype.kind != "f":
            return np.zeros(v.shape, bool)
        if k in self.floats and self.fields[k].dtype == "float32" and v.dtype.itemsize > 4:
            with np.errstate(over="ignore"):
                return ~np.isfinite(v.astype(np.float32))
        return ~np.isfinite(v)

    def _bad_rows(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        n = len(next(iter(batch.values())))
        bad = np.zeros(n, bool)
        for k, v in batch.items():
            if n and v.size:
                bad |= self._nonfinite(k, v).reshape(n, -1).any(axis=1)
        return bad

    def check(self, batch: Mapping[str, np.ndarray], first_row: int = 0,
              rows: np.ndarray | None = None) -> np.ndarray:
        """Raise a ValueError naming the source, field, count and first rows/values for NaN/Inf
        (with ``on_bad_rows="error"``), values the stored dtype cannot hold exactly, and negative
        labels/ids; otherwise return the bad-row mask (rows to drop). ``rows``: the source's row
        numbers (default ``first_row``, ``first_row + 1``, ...)."""
        batch = {k: np.asarray(v) for k, v in batch.items()}
        n = len(next(iter(batch.values())))
        if n == 0:
            return np.zeros(0, bool)
        rows = np.arange(first_row, first_row + n) if rows is None else np.asarray(rows)
        span = f"source rows {int(rows.min())}..{int(rows.max())}"
        bad = self._bad_rows(batch)
        if bad.any() and self.cfg.on_bad_rows == "error":
            first = [(k, v, m) for k, v in batch.items() if (m := self._nonfinite(k, v)).any()]
            pos = {k: ", ".join(positions(v, m, rows, names=self._cols(k))) for k, v, m in first}
            head, where = (self._where(first[0][0]), pos[first[0][0]]) if len(first) == 1 else (
                self.source or "source", "; ".join(f"{self._label(k)} {p}" for k, p in pos.items()))
            raise ValueError(f"{head}: {int(bad.sum())} row(s) with NaN/Inf among {span} (first: {where}); "
                             "fix the source, or pass --on-bad-rows drop to drop (and count) such rows")
        keep = ~bad
        for k in self.floats:
            self._check_fit(k, batch[k][keep], rows[keep], span)
        for k in ("y",) if self.task == "classification" else ("user", "item") if self.task == "ratings" else ():
            v = batch[k][keep]
            neg = v < 0
            if neg.any():
                what = "labels (class indices)" if k == "y" else "ids"
                raise ValueError(f"{self._where(k)}: {int(neg.sum())} negative {what} among {span} (first: "
                                 f"{', '.join(positions(v, neg, rows[keep]))}); {what} must be >= 0")
        return bad

    def _cols(self, k: str):
        name = self.names.get(k)
        return None if name is None or isinstance(name, str) else list(name)

    def _check_fit(self, k: str, v: np.ndarray, rows: np.ndarray, span: str) -> None:
        """Values of a float field must fit its stored dtype: exactly for integer dtypes, within
        range (rounded) for float16/bfloat16."""
        spec = self.fields[k]
        if spec.stored == v.dtype.name or spec.stored == "float32" or not v.size:
            return
        if spec.encoding is None and np.dtype(spec.dtype).kind in "iu":
            info = np.iinfo(spec.dtype)
            if v.dtype.kind == "f":
                misfit = (v != np.rint(v)) | (v < info.min) | (v > info.max)
            elif v.dtype.kind in "iu":
                misfit = (v < info.min) | (v > info.max)
            else:
                misfit = np.zeros(v.shape, bool)
            rule = f"only integers {info.min}..{info.max} are stored exactly"
        else:
            with np.errstate(over="ignore"):
                wide = v.astype(np.float32)
                stored = to_float32(to_bfloat16_bits(wide), spec) if spec.encoding else wide.astype(spec.dtype)
            misfit = ~np.isfinite(stored)
            rule = f"beyond {spec.stored}'s range"
        if misfit.any():
            raise ValueError(
                f"{self._where(k)}: {int(misfit.sum())} value(s) among {span} do not fit --store-dtype "
                f"{spec.stored} ({rule}; first: {', '.join(positions(v, misfit, rows, names=self._cols(k)))}); store a "
                "wider dtype (--store-dtype uint16|float16|float32) or round/clip the source first")

    # -- writing ---------------------------------------------------------------------------
    def _store(self, k: str, v: np.ndarray) -> np.ndarray:
        spec = self.fields[k]
        if spec.encoding == "bfloat16":
            return to_bfloat16_bits(v)
        with np.errstate(over="ignore", invalid="ignore"):
            return v.astype(spec.dtype, copy=False)

    def add(self, batch: Mapping[str, np.ndarray], rows: np.ndarray | None = None, checked: bool = False) -> None:
        """Append rows (``rows``: their numbers in the source, for error messages). ``checked``:
        ``check`` already passed on a batch holding these rows (``write_splits`` checks each chunk
        once before dealing it to the splits)."""
        batch = {k: np.asarray(batch[k]) for k in self.fields}
        n = len(batch[next(iter(self.fields))])
        for k, spec in self.fields.items():
            if batch[k].shape != (n,) + spec.shape:
                raise ValueError(f"{self._where(k)}: batch has shape {batch[k].shape}, expected "
                                 f"({n}, {', '.join(map(str, spec.shape))})")
        bad = self._bad_rows(batch) if checked else self.check(batch, self.rows_seen, rows)
        self.rows_seen += n
        if bad.any():
            self.dropped += int(bad.sum())
            batch = {k: v[~bad] for k, v in batch.items()}
            n = int((~bad).sum())
        batch = {k: self._store(k, v) for k, v in batch.items()}
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
            rows = min(block_rows(self.fields), self.cfg.samples_per_shard)
            ds = self._h5.create_dataset(k, shape=(0,) + spec.shape, maxshape=(None,) + spec.shape, dtype=spec.dtype,
                                         chunks=(rows,) + spec.shape, compression=comp)
            if spec.encoding:  # so that `hpc data index` (and other readers) know the bits' meaning
                ds.attrs["encoding"] = spec.encoding
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

    def abort(self, discard: bool | None = None) -> None:
        """Drop the partial shard (its temporary file is removed); no manifest is written.

        ``discard``: also remove the shards this writer published and the directories it created
        (when empty). Default: when aborted while handling an ``Exception`` (bad input, a full
        disk: the rerun starts over), not for an interrupt (KeyboardInterrupt, SystemExit), whose
        complete shards stay, as after a kill."""
        if discard is None:
            discard = isinstance(sys.exc_info()[1], Exception)
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
        self._stack = contextlib.ExitStack()
        if discard:
            for info in self.shards:
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / info.file).unlink()
            self.shards = []
            # Deepest first, up to the first directory no writer made; a parent shared with other
            # splits goes with the last of their writers to be aborted.
            for d in (self.dir, *self.dir.parents):
                if str(d) not in _MADE_DIRS:
                    break
                try:
                    d.rmdir()
                except OSError:  # not empty: another split's writer (or a user's file) is there
                    break
                _MADE_DIRS.discard(str(d))

    def close(self, provenance: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
              table: dict | None = None) -> Manifest:
        """``table``: the fitted table transform (``hpc.data.tabular``) recorded in the manifest."""
        if self._h5 is not None and self._n:
            self._close_shard()
        elif self._h5 is not None:
            self.abort(discard=False)
        m = Manifest(task=self.task, fields=self.fields, shards=self.shards, path=self.dir, table=table)
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
            self.abort(discard=issubclass(exc_type, Exception))
