"""Sources for `hpc data shard`: .npz/.npy arrays, CSV files, scikit-learn's bundled data sets.

Every source is an iterator of chunks (dict field -> array); ``write_splits`` deals each chunk's
rows to the splits (seeded, exact fractions per chunk) and streams them to one ``ShardWriter`` per
split, so a CSV bigger than memory is sharded with constant memory. Rows keep their source order
inside each split (the reader shuffles; shuffle a sorted source before sharding if its sort order
is long-range, see docs/data.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from hpc.data.manifest import FieldSpec, Manifest
from hpc.data.writer import ShardWriter, WriterConfig, provenance
from hpc.util.progress import Progress

SKLEARN_SETS = ("digits", "breast_cancer", "wine", "iris")
READ_ROWS = 65536  # rows per chunk read from a CSV / sliced from an array


def parse_split(spec: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> ordered dict; fractions must be > 0 and sum to 1."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, eq, frac = part.strip().partition("=")
        try:
            value = float(frac)
        except ValueError:
            value = -1.0
        if not eq or not name or value <= 0 or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"--split {spec!r}: each part must be NAME=FRACTION with FRACTION > 0, "
                             "e.g. train=0.8,val=0.1,test=0.1")
        if name in out:
            raise ValueError(f"--split {spec!r}: split {name!r} given twice")
        out[name] = value
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise ValueError(f"--split {spec!r}: fractions sum to {sum(out.values()):g}, not 1")
    return out


def split_labels(n: int, fractions: Mapping[str, float], rng: np.random.Generator,
                 carry: np.ndarray | None = None) -> np.ndarray:
    """Assign ``n`` rows to splits (indices into ``fractions``): exact counts up to rounding, seeded.

    ``carry`` (float array, updated in place) holds the rounding remainders between chunks, so over a
    stream of chunks every split's count stays within 1 of its fraction of the total.
    """
    fr = np.asarray(list(fractions.values()), np.float64)
    carry = np.zeros(len(fr)) if carry is None else carry
    want = fr * n + carry
    counts = np.floor(want).astype(np.int64)
    short = n - counts.sum()
    order = np.argsort(-(want - counts), kind="stable")
    counts[order[:short]] += 1
    carry[:] = want - counts
    labels = np.repeat(np.arange(len(fr)), counts)
    return labels[rng.permutation(n)] if len(fractions) > 1 else labels


def write_splits(chunks: Iterable[Mapping[str, np.ndarray]], out: str | os.PathLike, task: str,
                 fields: Mapping[str, FieldSpec], split: str, seed: int, config: WriterConfig,
                 source: str, extra: Mapping | None = None, progress: Progress | None = None,
                 **counts) -> dict[str, Manifest]:
    """``progress``: advanced by the rows of each chunk read (closed here; None: silent)."""
    progress = Progress(None, enabled=False) if progress is None else progress
    fractions = parse_split(split)
    out = Path(out)
    writers = {name: ShardWriter(out / name, task, fields, config, **counts) for name in fractions}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5117]))
    carry = np.zeros(len(fractions))
    try:
        for chunk in chunks:
            n = len(next(iter(chunk.values())))
            labels = split_labels(n, fractions, rng, carry)
            for i, (name, w) in enumerate(writers.items()):
                sel = labels == i
                if sel.any():
                    w.add({k: v[sel] for k, v in chunk.items()})
            progress.update(n)
    except BaseException:
        progress.close(final=False)
        for w in writers.values():
            w.abort()
        raise
    prov = provenance(source, seed, {"split": fractions})
    manifests = {name: w.close(prov, extra) for name, w in writers.items()}
    progress.close()  # after the last shards and manifests: the closing line times all the work
    return manifests


# -- sources -------------------------------------------------------------------------------------
def _infer_task(y: np.ndarray, task: str | None) -> str:
    if task:
        return task
    return "classification" if y.dtype.kind in "iub" else "regression"


def _xy_fields(x: np.ndarray, y: np.ndarray, task: str) -> dict[str, FieldSpec]:
    ydt = "int64" if task == "classification" else "float32"
    return {"x": FieldSpec("float32", tuple(x.shape[1:])), "y": FieldSpec(ydt, ())}


def _slices(arrays: Mapping[str, np.ndarray], rows: int = READ_ROWS) -> Iterator[dict]:
    n = len(next(iter(arrays.values())))
    for s in range(0, n, rows):
        yield {k: np.asarray(v[s:s + rows]) for k, v in arrays.items()}


def arrays_from_npz(path: Path, x_key: str, y_key: str) -> dict[str, np.ndarray]:
    if path.suffix == ".npy":  # the features; the labels are the sibling file <label>.npy
        ypath = path.with_name(f"{y_key}.npy")
        if not ypath.exists():
            raise ValueError(f"{path}: a .npy holds one array; the labels must be in {ypath} (--label "
                             f"names it) or pass a .npz with '{x_key}' and '{y_key}' arrays")
        # Memory-mapped: sharding a .npy bigger than memory reads it slice by slice.
        x, y = np.load(path, mmap_mode="r", allow_pickle=False), np.load(ypath, mmap_mode="r", allow_pickle=False)
        if len(x) != len(y):
            raise ValueError(f"{path} has {len(x)} rows but {ypath} has {len(y)}")
        return {"x": x, "y": y}
    data = np.load(path, mmap_mode="r", allow_pickle=False)
    keys = list(data.keys())
    for k in (x_key, y_key):
        if k not in keys:
            raise ValueError(f"{path}: no array {k!r}; it holds {keys} (choose with --x/--label)")
    x, y = data[x_key], data[y_key]
    if len(x) != len(y):
        raise ValueError(f"{path}: {x_key} has {len(x)} rows but {y_key} has {len(y)}")
    return {"x": x, "y": y}


def arrays_from_sklearn(name: str) -> dict[str, np.ndarray]:
    if name not in SKLEARN_SETS:
        raise ValueError(f"sklearn:{name}: valid are {', '.join('sklearn:' + s for s in SKLEARN_SETS)}")
    try:
        import sklearn.datasets as skd
    except ImportError:
        raise ValueError("sklearn sources need scikit-learn: pip install 'hpc-model-pipeline[sklearn]'") from None
    bunch = getattr(skd, f"load_{name}")()
    return {"x": np.asarray(bunch.data), "y": np.asarray(bunch.target)}


def csv_chunks(path: Path, label: str, task: str | None) -> tuple[Iterator[dict], str, dict]:
    """Stream a CSV with pyarrow (constant memory); every column except ``label`` is a feature."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=16 << 20))
    names = reader.schema.names
    if label not in names:
        raise ValueError(f"{path}: no column {label!r} (--label); columns are {names}")
    feats = [c for c in names if c != label]
    ytype = reader.schema.field(label).type
    task = task or ("classification" if pa.types.is_integer(ytype) else "regression")
    fields = {"x": FieldSpec("float32", (len(feats),)),
              "y": FieldSpec("int64" if task == "classification" else "float32", ())}

    def gen() -> Iterator[dict]:
        for rb in reader:
            x = np.column_stack([rb.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                                 for c in feats]) if feats else np.zeros((rb.num_rows, 0))
            y = np.asarray(rb.column(label).to_numpy(zero_copy_only=False))
            if task == "classification" and y.dtype.kind not in "iu":
                if y.dtype.kind != "f" or not pa.types.is_integer(ytype):
                    raise ValueError(f"{path}: label column {label!r} is not integer; pass --task regression")
                # An integer column with empty cells arrives as float with NaN: make those rows
                # bad rows (dropped or rejected by --on-bad-rows like any NaN).
                missing = np.isnan(y)
                x[missing] = np.nan
                y = np.where(missing, 0, y).astype(np.int64)
            yield {"x": x, "y": y}

    return gen(), task, fields


def shard_source(source: str, out: str | os.PathLike, *, split: str, seed: int, config: WriterConfig,
                 label: str = "y", x_key: str = "x", task: str | None = None,
                 progress: bool = False) -> dict[str, Manifest]:
    """Shard ``source`` (a .npz path, a .csv path or ``sklearn:NAME``) into ``out/<split>/``.

    ``progress``: rows read so far on stderr (``hpc.util.progress``; a CSV's total is unknown, so
    its lines carry no percentage or ETA)."""
    if source.startswith("sklearn:"):
        arrays = arrays_from_sklearn(source.split(":", 1)[1])
    else:
        path = Path(source)
        if not path.exists():
            raise ValueError(f"--from {source}: file not found")
        if path.suffix.lower() in (".csv", ".txt"):
            chunks, task, fields = csv_chunks(path, label, task)
            return write_splits(chunks, out, task, fields, split, seed, config, source=str(path),
                                progress=Progress(None, label="shard", enabled=progress))
        if path.suffix.lower() not in (".npz", ".npy"):
            raise ValueError(f"--from {source}: unknown kind; valid are .npz, .csv, sklearn:NAME "
                             f"({', '.join(SKLEARN_SETS)})")
        arrays = arrays_from_npz(path, x_key, label)
    task = _infer_task(arrays["y"], task)
    if task not in ("classification", "regression"):
        raise ValueError(f"--task {task!r}: arrays sources hold x/y; valid are classification, regression")
    fields = _xy_fields(arrays["x"], arrays["y"], task)
    return write_splits(_slices(arrays), out, task, fields, split, seed, config, source=source,
                        progress=Progress(len(arrays["x"]), label="shard", enabled=progress))
