"""Partition writers: one file per input shard, in parquet, HDF5 or CSV, written atomically.

A partition is a dict of numpy columns (or pyarrow arrays: a table's id columns, kept as the file
has them) of equal length; 2-D columns (probabilities ``[N, C]``,
top-k ``[N, K]``) become fixed-size lists in parquet, 2-D datasets in HDF5 and ``name_0..name_K-1``
columns in CSV (CSV has no lists). Every writer is deterministic (the same columns give the same
bytes: no timestamps; HDF5 datasets are written with ``track_times=False``), which is what lets a
rerun after kill -9 reproduce an uninterrupted run byte for byte.

Each file goes through ``hpc.util.io.atomic_path`` (temporary name, fsync, rename; group-readable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from hpc.util.io import atomic_path

FORMATS = {"parquet": "parquet", "hdf5": "h5", "csv": "csv"}


def partition_name(shard: int, fmt: str) -> str:
    return f"part-{shard:05d}.{FORMATS[fmt]}"


def _arrow_table(columns: Mapping[str, np.ndarray], meta: Mapping[str, str], flatten: bool):
    names, arrays = [], []
    for name, col in columns.items():
        if isinstance(col, pa.Array):  # an id column of a table input, with its own type and nulls
            names.append(name)
            arrays.append(col)
            continue
        col = np.asarray(col)
        if col.ndim == 2 and flatten:
            for j in range(col.shape[1]):
                names.append(f"{name}_{j}")
                arrays.append(pa.array(np.ascontiguousarray(col[:, j])))
        elif col.ndim == 2:
            names.append(name)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(col.reshape(-1)), col.shape[1]))
        elif col.dtype.kind in "OU":
            names.append(name)
            arrays.append(pa.array(col.tolist(), type=pa.string()))
        else:
            names.append(name)
            arrays.append(pa.array(col))
    table = pa.Table.from_arrays(arrays, names=names)
    return table.replace_schema_metadata({f"hpc.{k}": str(v) for k, v in meta.items()})


def _write_parquet(tmp: Path, columns, meta) -> None:
    pq.write_table(_arrow_table(columns, meta, flatten=False), tmp)


def _write_csv(tmp: Path, columns, meta) -> None:
    pcsv.write_csv(_arrow_table(columns, meta, flatten=True), tmp)


def _write_hdf5(tmp: Path, columns, meta) -> None:
    with h5py.File(tmp, "w", track_order=False) as f:
        for k, v in meta.items():
            f.attrs[k] = str(v)
        for name, col in columns.items():
            col = col.to_numpy(zero_copy_only=False) if isinstance(col, pa.Array) else np.asarray(col)
            if col.dtype.kind in "OU":
                f.create_dataset(name, data=np.array(col.tolist(), dtype=object),
                                 dtype=h5py.string_dtype(), track_times=False)
            else:
                f.create_dataset(name, data=col, track_times=False)


_WRITERS = {"parquet": _write_parquet, "csv": _write_csv, "hdf5": _write_hdf5}


def write_partition(dest: Path, fmt: str, columns: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> None:
    """Write ``columns`` to ``dest`` atomically in ``fmt`` (parquet | hdf5 | csv)."""
    if fmt not in _WRITERS:
        raise ValueError(f"--format {fmt!r}: valid are {', '.join(_WRITERS)}")
    lengths = {len(c) for c in columns.values()}
    assert len(lengths) <= 1, {k: len(c) for k, c in columns.items()}
    with atomic_path(dest) as tmp:
        _WRITERS[fmt](tmp, columns, meta)


def count_rows(path: Path, fmt: str) -> int:
    """Rows in a written partition (used by tests and by `hpc infer` to validate one)."""
    if fmt == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if fmt == "hdf5":
        with h5py.File(path, "r") as f:
            return len(f["index"])
    return pcsv.read_csv(path).num_rows
