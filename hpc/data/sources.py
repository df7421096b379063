"""Sources for `hpc data shard`: .npz/.npy arrays, tables (CSV/Parquet files or a directory of
them: ``shard_table``, the transform in ``hpc.data.tabular``), scikit-learn's bundled data sets.

Every source is an iterator of chunks (dict field -> array); ``write_splits`` deals each chunk's
rows to the splits (seeded, exact fractions per chunk) and streams them to one ``ShardWriter`` per
split, so a table bigger than memory is sharded with constant memory. Rows keep their source order
inside each split (the reader shuffles; shuffle a sorted source before sharding if its sort order
is long-range, see docs/data.md).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa

from hpc.data.manifest import FieldSpec, Manifest
from hpc.data.tablefiles import check_columns, chunks, header_lines, is_table_input, read_schema, table_files
from hpc.data.tabular import (Fitter, TableOptions, Where, apply, encode_labels, ids_int64, plan, read_types,
                              refuse_missing, required_columns, shard_ids)
from hpc.data.writer import ShardWriter, WriterConfig, provenance
from hpc.util.progress import Progress

SKLEARN_SETS = ("digits", "breast_cancer", "wine", "iris", "diabetes")  # diabetes: regression
READ_ROWS = 65536  # rows per chunk read from a CSV / sliced from an array
DEFAULT_SPLIT = "train=0.8,val=0.1,test=0.1"


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


def dealer(fractions: Mapping[str, float], seed: int) -> Callable[[int], np.ndarray]:
    """``deal(n)``: the split of each of the next ``n`` rows, chunk after chunk (``split_labels``,
    seeded). ``write_splits`` deals with it; a table's fitting pass replays it to know which rows
    the training split gets."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5117]))
    carry = np.zeros(len(fractions))
    return lambda n: split_labels(n, fractions, rng, carry)


def write_splits(chunks: Iterable[Mapping[str, np.ndarray]], out: str | os.PathLike, task: str,
                 fields: Mapping[str, FieldSpec], split: str, seed: int, config: WriterConfig,
                 source: str, extra: Mapping | None = None, progress: Progress | None = None,
                 names: Mapping | None = None, table: dict | None = None, **counts) -> dict[str, Manifest]:
    """``progress``: advanced by the rows of each chunk read (closed here; None: silent).
    ``names``: what errors call the fields in the source (``ShardWriter``), e.g. {"x": "images"}.
    ``table``: the fitted table transform every split's manifest records."""
    progress = Progress(None, enabled=False) if progress is None else progress
    fractions = parse_split(split)
    out = Path(out)
    writers = {name: ShardWriter(out / name, task, fields, config, source=source, names=names, **counts)
               for name in fractions}
    done = 0  # source rows read: each chunk is checked whole (counts, source rows) before dealing
    deal = dealer(fractions, seed)
    try:
        for chunk in chunks:
            n = len(next(iter(chunk.values())))
            next(iter(writers.values())).check(chunk, done)
            labels = deal(n)
            for i, (name, w) in enumerate(writers.items()):
                sel = labels == i
                if sel.any():
                    w.add({k: v[sel] for k, v in chunk.items()}, rows=np.flatnonzero(sel) + done, checked=True)
            done += n
            progress.update(n)
    except BaseException:
        progress.close(final=False)
        for w in writers.values():
            w.abort()
        raise
    prov = provenance(source, seed, {"split": fractions})
    manifests = {name: w.close(prov, extra, table=table) for name, w in writers.items()}
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


def shard_source(source: str, out: str | os.PathLike, *, split: str | None = None, seed: int,
                 config: WriterConfig, label: str = "y", x_key: str = "x", task: str | None = None,
                 progress: bool = False, num_classes: int | None = None, table: TableOptions | None = None,
                 transform: dict | None = None) -> dict[str, Manifest]:
    """Shard ``source`` (a .npz/.npy path, a table: .csv/.parquet file or a directory of them, or
    ``sklearn:NAME``) into ``out/<split>/``. Tables take ``table`` (``TableOptions``: label, ids,
    classes, encodings, missing cells) or a recorded ``transform`` (``shard_table``); ``split``
    defaults to train=0.8,val=0.1,test=0.1 (an unlabeled table: all=1).

    ``progress``: rows read so far on stderr (``hpc.util.progress``; a CSV's total is unknown, so
    its lines carry no percentage or ETA)."""
    if source.startswith("sklearn:"):
        arrays = arrays_from_sklearn(source.split(":", 1)[1])
    else:
        path = Path(source)
        if not path.exists():
            raise ValueError(f"--from {source}: file not found")
        if is_table_input(path):
            return shard_table(path, out, split=split, seed=seed, config=config,
                               opts=table or TableOptions(label=label, task=task), transform=transform,
                               progress=progress)
        if path.suffix.lower() not in (".npz", ".npy"):
            raise ValueError(f"--from {source}: unknown kind; valid are .npz, .npy, a table (.csv, .parquet "
                             f"or a directory of them), sklearn:NAME ({', '.join(SKLEARN_SETS)})")
        arrays = arrays_from_npz(path, x_key, label)
    task = _infer_task(arrays["y"], task)
    if task not in ("classification", "regression"):
        raise ValueError(f"--task {task!r}: arrays sources hold x/y; valid are classification, regression")
    fields = _xy_fields(arrays["x"], arrays["y"], task)
    names = {"x": x_key, "y": label} if source.lower().endswith(".npz") else None  # the arrays, in errors
    counts = {"num_classes": _num_classes(arrays["y"], source, num_classes)} if task == "classification" else {}
    return write_splits(_slices(arrays), out, task, fields, split or DEFAULT_SPLIT, seed, config, source=source,
                        progress=Progress(len(arrays["x"]), label="shard", enabled=progress), names=names,
                        **counts)


def _num_classes(y: np.ndarray, source: str, stated: int | None) -> int | None:
    """Every split's number of classes, so a class only the test split has cannot outgrow the
    model: ``stated`` (``--num-classes``; a label beyond it is refused, naming the row) or the
    largest label + 1 over all rows."""
    if stated is not None:
        bad = np.flatnonzero(np.asarray(y) >= stated)
        if len(bad):
            raise ValueError(f"{source}: row {int(bad[0])}: label {np.asarray(y)[bad[0]].item()!r} is outside "
                             f"the classes 0..{stated - 1} (--num-classes {stated})")
        return stated
    return int(np.max(y)) + 1 if len(y) else None


# -- tables: CSV / Parquet with a header ---------------------------------------------------------
def _table_chunks(files: list[Path], columns: list[str], types: dict) -> Iterator[tuple[Path, int, "pa.Table"]]:
    for f in files:
        for first, tab in chunks(f, columns, types, READ_ROWS):
            yield f, first, tab


def shard_table(path: Path, out: str | os.PathLike, *, split: str | None, seed: int, config: WriterConfig,
                opts: TableOptions, transform: dict | None = None, progress: bool = False) -> dict[str, Manifest]:
    """Shard a table (a CSV/Parquet file or a directory of them) in two streaming passes.

    Pass 1 checks every row's label against the classes (with ``--on-bad-rows error``, every cell)
    and fits the transform (``hpc.data.tabular``) on the rows the training split gets (it replays
    pass 2's dealing); pass 2 applies the transform and writes the shards. Bad input is refused in
    pass 1, before anything is written. ``transform``: apply a recorded transform (the training
    data's, to shard new rows for scoring or evaluation) instead of fitting one; the split is then
    labeled if the table has the transform's label column.
    """
    files = table_files(path)
    schema = read_schema(files[0])
    spec = transform if transform is not None else plan(schema, opts, str(files[0]))
    labeled = bool(spec.get("label")) and spec["label"]["column"] in schema.names
    needed = required_columns(spec, labels=labeled)
    for f in files:
        check_columns(f, schema if f == files[0] else read_schema(f), needed,
                      "the recorded transform's" if transform is not None else f"those of {files[0].name}")
    types = read_types(spec, labels=labeled)
    split = split or (DEFAULT_SPLIT if labeled else "all=1")
    fractions = parse_split(split)
    train = "train" if "train" in fractions else next(iter(fractions))
    fitter = Fitter(spec, opts, seed) if transform is None else None
    per = np.zeros(len(fractions), np.int64)
    deal = dealer(fractions, seed)
    for f, first, tab in _table_chunks(files, needed, types):  # pass 1: check, fit
        where = Where(str(f), first, header_lines(f))
        labels = deal(tab.num_rows)
        per += np.bincount(labels, minlength=len(per))
        if opts.missing == "error":
            refuse_missing(spec, tab, where)
        if fitter is not None:
            fitter.labels(tab, where)
            fitter.features(tab, where, labels == list(fractions).index(train))
        elif labeled and spec["label"]["encoding"] != "value":
            encode_labels(spec["label"], tab.column(spec["label"]["column"]), where)
    name = str(path)
    if not per.sum():
        raise ValueError(f"{name}: no data rows (only a header); nothing written")
    empty = [s for s, k in zip(fractions, per) if not k]
    if empty:
        raise ValueError(f"{name}: its {int(per.sum())} row(s) leave split(s) {', '.join(empty)} empty "
                         f"(--split {split}); use more rows or fewer splits")
    t = fitter.result(name, train) if fitter is not None else transform
    task = t["task"] if labeled else None
    ids = shard_ids(t)
    fields, names = {"x": FieldSpec("float32", (len(t["x_columns"]),))}, {"x": t["x_columns"]}
    if labeled:
        fields["y"] = FieldSpec("int64" if task == "classification" else "float32", ())
        names["y"] = t["label"]["column"]
    if ids:
        fields["ids"], names["ids"] = FieldSpec("int64", (len(ids),)), ids
    counts = {"num_classes": t["label"]["num_classes"]} if task == "classification" else {}

    def gen() -> Iterator[dict]:  # pass 2: apply; rows to drop get NaN features (the writer counts them)
        for f, first, tab in _table_chunks(files, needed, types):
            where = Where(str(f), first, header_lines(f))
            a = apply(t, tab, where, opts.missing, labels=labeled)
            out = {"x": a.x, **({"y": a.y} if labeled else {})}
            if ids:
                out["ids"], no_id = ids_int64(t, tab, where)
                a.drop |= no_id
            a.x[a.drop] = np.nan
            yield out

    return write_splits(gen(), out, task, fields, split, seed, dataclasses.replace(config, on_bad_rows="drop"),
                        source=name, progress=Progress(None, label="shard", enabled=progress), names=names,
                        table=t, **counts)
