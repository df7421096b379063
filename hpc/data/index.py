"""`hpc data index`: a manifest for HDF5 files somebody else wrote, without copying their data.

Any chunk layout or compression, any dataset names, several files of uneven size. One streaming
pass over each file computes its sha256 and, in chunk-aligned slices, the statistics and class
counts the manifest records (memory: one slice, ~64 MB). Files inside the directory are recorded
relative to it, files elsewhere by absolute path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np

from hpc.data.manifest import MANIFEST_NAME, TASK_FIELDS, FieldSpec, Manifest, ShardInfo, write_manifest
from hpc.data.writer import Accounts, provenance
from hpc.util.io import sha256_file
from hpc.util.progress import Progress

SLICE_BYTES = 64 << 20


def _infer_task(fields: Mapping[str, FieldSpec], task: str | None) -> str:
    if task:
        if task not in TASK_FIELDS:
            raise ValueError(f"--task {task!r}: valid are {', '.join(TASK_FIELDS)}")
        return task
    if set(TASK_FIELDS["ratings"]) <= set(fields):
        return "ratings"
    if "y" in fields and np.dtype(fields["y"].dtype).kind in "iub":
        return "classification"
    return "regression"


def index_hdf5(directory: str | os.PathLike, datasets: Mapping[str, str], files: Sequence[str] | None = None,
               task: str | None = None, overwrite: bool = False, progress: bool = False) -> Manifest:
    """``progress``: rows read by the statistics pass so far on stderr (``hpc.util.progress``)."""
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
                    raise ValueError(f"{p}: no dataset {dpath!r} for field {name!r}; datasets are {have}")
                spec = FieldSpec(ds.dtype.name, tuple(ds.shape[1:]))
                if fields.setdefault(name, spec) != spec:
                    raise ValueError(f"{p}: field {name!r} is {spec.dtype}{list(spec.shape)} but "
                                     f"{paths[0]} has {fields[name].dtype}{list(fields[name].shape)}")
                lengths[name] = ds.shape[0]
            if len(set(lengths.values())) != 1:
                raise ValueError(f"{p}: fields have different row counts {lengths}")
            counts.append(next(iter(lengths.values())))
    task = _infer_task(fields, task)
    acc = Accounts(task, fields)
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
                acc.update({k: ds[a:a + step] for k, ds in dss.items()})
                bar.update(min(step, n - a))
        rel = os.path.relpath(p.resolve(), d.resolve())
        name = rel if not rel.startswith("..") else str(p.resolve())
        shards.append(ShardInfo(name, n, os.path.getsize(p), sha256_file(p), dict(datasets)))
    bar.close()
    m = Manifest(task=task, fields=fields, shards=shards, path=d.resolve())
    acc.fill(m)
    m.bad_rows = {"policy": "none (indexed in place)", "dropped": 0}
    m.provenance = provenance(f"index:{d}", None, {"indexed": True})
    write_manifest(d, m)
    return m
