"""`hpc data index`: a manifest for HDF5 files somebody else wrote, without copying their data.

Any chunk layout or compression, any dataset names, several files of uneven size, compact
feature dtypes (uint8/int8/uint16/int16/float16 images are read as they are and yielded as float32).
One streaming pass over each file computes its sha256 and, in chunk-aligned slices, the
statistics and class counts the manifest records and the NaN/Inf and label checks (memory: one
slice, ~64 MB). Files inside the directory are recorded
relative to it, files elsewhere by absolute path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np

from hpc.data.manifest import (ENCODINGS, FLOAT_STORAGE, MANIFEST_NAME, TASK_FIELDS, FieldSpec, Manifest,
                               ShardInfo, float_fields, float_storage_problem, write_manifest)
from hpc.data.shardio import to_float32
from hpc.data.writer import SHOW, Accounts, positions, provenance
from hpc.util.io import sha256_file
from hpc.util.progress import Progress

SLICE_BYTES = 64 << 20
FLAGS = {"x": "--x PATH", "y": "--y PATH"}


def _infer_task(fields: Mapping[str, FieldSpec], task: str | None) -> str | None:
    if task:
        if task not in TASK_FIELDS:
            raise ValueError(f"--task {task!r}: valid are {', '.join(TASK_FIELDS)}")
        return task
    if set(TASK_FIELDS["ratings"]) <= set(fields):
        return "ratings"
    if "y" in fields and fields["y"].encoding is None and np.dtype(fields["y"].dtype).kind in "iub":
        return "classification"
    if "y" not in fields and "rating" not in fields:
        return None  # no labels: an unlabeled split (`hpc infer` scores it, `hpc train` refuses it)
    return "regression"


def _check_task(task: str | None, fields: Mapping[str, FieldSpec], where: Mapping[str, str], inferred: bool) -> None:
    """Every field the task needs is there with a dtype it can use; errors name the user's dataset."""
    for name, kind in {**({"x": "f"} if "x" in fields else {}), **TASK_FIELDS.get(task, {})}.items():
        if name not in fields:
            flag = FLAGS.get(name, f"--field {name}=PATH")
            raise ValueError(f"task {task} needs {flag} (the dataset of field {name!r})"
                             + ("; or pass --task" if inferred else
                                "; for files without labels omit --task: they index as an unlabeled split"))
        spec = fields[name]
        if kind == "f":
            problem = float_storage_problem(spec)
        elif spec.encoding is not None or np.dtype(spec.dtype).kind not in "iu":
            problem = (f"dtype {spec.stored}: task {task} needs integer {'labels' if name == 'y' else 'ids'}"
                       + (" (for float targets pass --task regression)" if name == "y" else ""))
        else:
            problem = None
        if problem:
            raise ValueError(f"{where[name]}: {problem}")


class Tally:
    """Rows with one kind of problem across files: the count and the first few positions."""

    def __init__(self, what: str):
        self.what, self.count, self.first, self.where = what, 0, [], []

    def add(self, where: str, values: np.ndarray, bad: np.ndarray, start: int) -> None:
        rows = bad.reshape(len(bad), -1).any(axis=1)
        if not rows.any():
            return
        self.count += int(rows.sum())
        if where not in self.where:
            self.where.append(where)
        if len(self.first) < SHOW:
            rows_n = np.arange(start, start + len(values))
            self.first += [f"{where} {pos}" for pos in positions(values, bad, rows_n, SHOW - len(self.first))]

    def message(self, fix: str) -> str:
        return (f"{', '.join(self.where)}: {self.count} row(s) with {self.what} (first: "
                f"{', '.join(self.first)}); {fix}")


def index_hdf5(directory: str | os.PathLike, datasets: Mapping[str, str], files: Sequence[str] | None = None,
               task: str | None = None, overwrite: bool = False, progress: bool = False) -> Manifest:
    """``progress``: rows read by the statistics pass so far on stderr (``hpc.util.progress``).

    Refused with a ValueError naming the file and dataset (``a.h5:/images``): a dtype the task
    cannot use, NaN/Inf in a float dataset or negative labels/ids (the count and the first rows,
    after reading everything). Nothing is written then."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{d}: not a directory")
    if not datasets:
        raise ValueError("name the datasets: --x PATH --y PATH (classification/regression) or "
                         "--field user=PATH --field item=PATH --field rating=PATH (ratings)")
    if (d / MANIFEST_NAME).exists() and not overwrite:
        raise ValueError(f"{d / MANIFEST_NAME}: exists; pass --overwrite to replace it")
    paths = [Path(f) for f in files] if files else sorted([*d.glob("*.h5"), *d.glob("*.hdf5")])
    if not paths:
        raise ValueError(f"{d}: no .h5/.hdf5 files (or pass --files)")
    fields: dict[str, FieldSpec] = {}
    first: dict[str, str] = {}  # field -> "file:/dataset" where its spec was first seen
    counts: list[int] = []
    for p in paths:
        try:
            f = h5py.File(p, "r")
        except OSError as e:
            raise ValueError(f"{p}: not a readable HDF5 file ({e})") from None
        with f:
            lengths = {}
            for name, dpath in datasets.items():
                ds = f.get(dpath)
                if not isinstance(ds, h5py.Dataset) or ds.ndim < 1:
                    have = []
                    f.visit(lambda k: have.append("/" + k) if isinstance(f[k], h5py.Dataset) else None)
                    raise ValueError(f"{p}: no dataset {dpath!r} (for field {name!r}); datasets are {have}")
                if ds.dtype.kind not in "biuf" or ds.dtype.names is not None:
                    raise ValueError(f"{p}:{dpath}: dtype {ds.dtype} is not numeric; hpc reads integer and "
                                     f"float datasets (features: {', '.join(FLOAT_STORAGE)})")
                encoding = ds.attrs.get("encoding")
                spec = FieldSpec(ds.dtype.name, tuple(ds.shape[1:]),
                                 str(encoding) if encoding in ENCODINGS else None)
                first.setdefault(name, f"{p}:{dpath}")
                if fields.setdefault(name, spec) != spec:
                    raise ValueError(f"{p}:{dpath} is {spec.stored}{list(spec.shape)} but {first[name]} is "
                                     f"{fields[name].stored}{list(fields[name].shape)}; every file must "
                                     "hold the same dtype and per-sample shape")
                lengths[name] = ds.shape[0]
            if len(set(lengths.values())) != 1:
                raise ValueError(f"{p}: datasets have different row counts "
                                 f"{ {datasets[k]: v for k, v in lengths.items()} }")
            counts.append(next(iter(lengths.values())))
    inferred = task is None
    task = _infer_task(fields, task)
    _check_task(task, fields, first, inferred)
    acc = Accounts(task, fields)
    floats = float_fields(task, fields)
    nonfinite, negative = Tally("NaN/Inf"), Tally("negative labels/ids")
    shards = []
    bar = Progress(sum(counts), label="index", enabled=progress)
    for p, n in zip(paths, counts):
        with h5py.File(p, "r") as f:
            dss = {k: f[v] for k, v in datasets.items()}
            per = max(int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize for ds in dss.values())
            chunk = (dss["x"] if "x" in dss else next(iter(dss.values()))).chunks
            step = max(1, SLICE_BYTES // max(per, 1))
            if chunk:  # whole chunks only: a compressed chunk is decompressed once
                step = max(chunk[0], step // chunk[0] * chunk[0])
            for a in range(0, n, step):
                batch = {k: ds[a:a + step] for k, ds in dss.items()}
                clean = True
                for k in floats:
                    v = to_float32(batch[k], fields[k]) if fields[k].encoding else batch[k]
                    if v.dtype.kind == "f":
                        bad = ~np.isfinite(v)
                        clean &= not bad.any()
                        nonfinite.add(f"{p}:{datasets[k]}", v, bad, a)
                for k in ("y",) if task == "classification" else ("user", "item") if task == "ratings" else ():
                    bad = batch[k] < 0
                    clean &= not bad.any()
                    negative.add(f"{p}:{datasets[k]}", batch[k], bad, a)
                if clean:
                    acc.update(batch)
                bar.update(min(step, n - a))
        rel = os.path.relpath(p.resolve(), d.resolve())
        name = rel if not rel.startswith("..") else str(p.resolve())
        shards.append(ShardInfo(name, n, os.path.getsize(p), sha256_file(p), dict(datasets)))
    bar.close(final=not (nonfinite.count or negative.count))
    problems = [t.message(fix) for t, fix in (
        (nonfinite, "fix these rows in the files: `hpc data index` reads them in place and cannot drop rows"),
        (negative, "labels (class indices) and ids must be >= 0")) if t.count]
    if problems:
        raise ValueError("; ".join(problems) + f" (nothing written to {d})")
    m = Manifest(task=task, fields=fields, shards=shards, path=d.resolve())
    acc.fill(m)
    m.bad_rows = {"policy": "none (indexed in place)", "dropped": 0}
    m.provenance = provenance(f"index:{d}", None, {"indexed": True})
    write_manifest(d, m)
    return m
