"""Tables with a header (CSV, Parquet): what each column is, and the fitted transform to features.

Columns are a label (``--label``; none: an unlabeled table), id columns (``--id COL``, and by
default every column named ``id`` or ``*_id``: kept out of the features, carried into predictions)
and features:

- numbers (integers, floats, booleans): the value; a missing cell (empty, NA, NaN, Inf) gets the
  training split's median, plus a ``COL:missing`` indicator column when the training split had any;
- text: one-hot over the training split's categories when there are at most ``max_onehot`` of them
  (plus ``COL=<other>``, where a category never seen in training goes), else hashed (crc32 of the
  UTF-8 text) into ``hash_buckets`` indicator columns; a missing cell gets the training split's most
  frequent category (and an indicator column, as for numbers).

Labels: text labels are class names, mapped to indices in sorted order (or in the order of
``--labels a,b,c``); integer labels are class indices 0..C-1 (``--num-classes C`` states C, else
max + 1); float labels are regression targets. A value outside the stated classes is refused,
naming the file, row and value.

``Fitter`` fits the transform in one streaming pass (features on the training split's rows; labels
on every row, since the classes are the data set's) into a JSON-able dict; ``apply`` turns a table
into the float32 feature matrix ``x`` and the labels ``y``, the same way at shard time and in
``hpc infer``. Scaling is not part of it: every source's features are standardized by readers with
the training manifest's per-feature mean/std, which the model card records. Pure: pyarrow tables
in, numpy arrays out; the files are read by ``hpc.data.tablefiles``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FORMAT = 1
MAX_ONEHOT = 32          # text columns with at most this many training categories are one-hot
HASH_BUCKETS = 64        # ... the others are hashed into this many indicator columns
MEDIAN_SAMPLE = 100_000  # training values kept per numeric column for its median (exact below this)
TRACK_CATEGORIES = 1_000_000  # distinct categories counted per text column (its mode is among them)
OTHER = "<other>"
NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"  # text that reads as a number
NUMERIC_SHARE = 0.9  # a text column whose values are nearly all numbers has a typo: refused, named
MISSING_POLICIES = ("impute", "drop", "error")
TASKS = ("classification", "regression")


def is_id_name(name: str) -> bool:
    n = name.lower()
    return n == "id" or n.endswith("_id")


def kind_of(t: pa.DataType) -> str:
    """number | text | other (what a column of this arrow type can be used as)."""
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_dictionary(t):
        return kind_of(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t):
        return "text"
    return "other"


@dataclass(frozen=True)
class Where:
    """Where a chunk of rows comes from, for error messages: file, first row, CSV header lines."""
    file: str = "table"
    first_row: int = 0              # of the chunk in its file, 0-based
    header_lines: int | None = None  # CSV: 1 (line numbers are shown too); Parquet: None

    def row(self, i: int) -> str:
        r = self.first_row + int(i) + 1
        line = f" (line {r + self.header_lines})" if self.header_lines is not None else ""
        return f"{self.file}: row {r}{line}"


@dataclass(frozen=True)
class TableOptions:
    label: str | None = None             # None: unlabeled
    ids: tuple[str, ...] = ()
    auto_ids: bool = True                # also every column named id / *_id
    task: str | None = None              # classification | regression (default: from the label)
    num_classes: int | None = None
    labels: tuple[str, ...] | None = None
    max_onehot: int = MAX_ONEHOT
    hash_buckets: int = HASH_BUCKETS
    missing: str = "impute"              # impute | drop | error

    def __post_init__(self) -> None:
        if self.missing not in MISSING_POLICIES:
            raise ValueError(f"--on-bad-rows {self.missing!r}: valid for tables are {', '.join(MISSING_POLICIES)}")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"--task {self.task!r}: valid for tables are {', '.join(TASKS)}")
        if self.max_onehot < 0:
            raise ValueError(f"--max-onehot {self.max_onehot}: must be >= 0 (0: hash every text column)")
        if self.hash_buckets < 1:
            raise ValueError(f"--hash-buckets {self.hash_buckets}: must be >= 1")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"--num-classes {self.num_classes}: must be >= 1")
        if self.labels is not None:
            if not self.labels or len(set(self.labels)) != len(self.labels) or "" in self.labels:
                raise ValueError(f"--labels {','.join(self.labels)}: give distinct, non-empty class names a,b,c")
            if self.num_classes is not None and self.num_classes != len(self.labels):
                raise ValueError(f"--num-classes {self.num_classes} and --labels ({len(self.labels)} names) "
                                 "disagree; give one of them")
        if (self.labels or self.num_classes) and self.task == "regression":
            raise ValueError("--labels/--num-classes state classes; --task regression has none")
        if (self.labels or self.num_classes) and self.label is None:
            raise ValueError("--labels/--num-classes state the classes of a label column: pass --label COL")
        if self.label is not None and self.label in self.ids:
            raise ValueError(f"--label {self.label!r} is also an --id column")


# ------------------------------------------------------------------------------------ the plan
def plan(schema: pa.Schema, opts: TableOptions, where: str = "table") -> dict:
    """Roles of the columns: ``{task, label: {column, kind} | None, ids: [{column, type, auto}],
    features: [{column, kind}]}``; ValueError naming the column for anything unusable."""
    names = list(schema.names)
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ValueError(f"{where}: column name(s) {dup} appear more than once in the header")
    if opts.label is not None and opts.label not in names:
        raise ValueError(f"{where}: no column {opts.label!r} (--label); columns are {names}")
    for c in opts.ids:
        if c not in names:
            raise ValueError(f"{where}: no column {c!r} (--id); columns are {names}")
    auto = [c for c in names if opts.auto_ids and c not in opts.ids and c != opts.label and is_id_name(c)]
    ids = [{"column": c, "type": str(schema.field(c).type), "auto": c in auto} for c in [*opts.ids, *auto]]
    id_names = {i["column"] for i in ids}
    features = []
    for c in names:
        if c == opts.label or c in id_names:
            continue
        kind = kind_of(schema.field(c).type)
        if kind == "other":
            raise ValueError(f"{where}: column {c!r} has type {schema.field(c).type}, neither a number nor "
                             "text; convert it to one, or name it with --id to keep it out of the features")
        features.append({"column": c, "kind": kind})
    if not features:
        raise ValueError(f"{where}: no feature columns (label {opts.label!r}, ids {sorted(id_names)}; "
                         f"columns are {names})")
    label, task = None, None
    if opts.label is not None:
        t = schema.field(opts.label).type
        kind = kind_of(t)
        if kind == "other":
            raise ValueError(f"{where}: label column {opts.label!r} has type {t}; labels are numbers or text")
        kind = "text" if kind == "text" else "float" if pa.types.is_floating(t) or pa.types.is_decimal(t) \
            else "integer"
        stated = opts.labels is not None or opts.num_classes is not None
        task = opts.task or ("regression" if kind == "float" and not stated else "classification")
        if kind == "text" and task == "regression":
            raise ValueError(f"{where}: label column {opts.label!r} holds text, and --task regression needs "
                             "numbers; text labels are class names (omit --task)")
        if kind == "text" and opts.num_classes is not None and opts.labels is None:
            raise ValueError(f"{where}: label column {opts.label!r} holds text (class names); state them "
                             "with --labels a,b,c (in index order) instead of --num-classes")
        label = {"column": opts.label, "kind": kind, "type": str(t)}
    return {"task": task, "label": label, "ids": ids, "features": features}


def read_types(t: dict, labels: bool = True) -> dict[str, pa.DataType]:
    """The arrow type each column of a plan or transform is read as (CSV column types)."""
    out: dict[str, pa.DataType] = {}
    for f in t["features"]:
        out[f["column"]] = pa.float64() if f["kind"] == "number" else pa.string()
    lab = t.get("label")
    if labels and lab:
        out[lab["column"]] = {"text": pa.string(), "float": pa.float64()}.get(lab["kind"]) or \
            _arrow_type(lab.get("type")) or pa.int64()
    for i in t["ids"]:
        if _arrow_type(i["type"]) is not None:
            out[i["column"]] = _arrow_type(i["type"])
    return out


def _arrow_type(name: str | None) -> pa.DataType | None:
    """The arrow type of its name (``int64``, ``bool``, ``string``), or None (read as the file says)."""
    try:
        return pa.type_for_alias(name) if name else None
    except (ValueError, KeyError):
        return None


def required_columns(t: dict, labels: bool = True) -> list[str]:
    cols = [f["column"] for f in t["features"]] + [i["column"] for i in t["ids"]]
    return cols + ([t["label"]["column"]] if labels and t.get("label") else [])


def shard_ids(t: dict) -> list[str]:
    """The id columns stored in shards (field ``ids``, int64): those of an integer type."""
    return [i["column"] for i in t["ids"] if _integer_type(i["type"])]


def _integer_type(name: str) -> bool:
    t = _arrow_type(name)
    return t is not None and pa.types.is_integer(t)


# ------------------------------------------------------------------------------------ fitting
class _Numbers:
    """A seeded uniform sample (bottom-k of random keys) of a column's training values + counts."""

    def __init__(self):
        self.keys, self.values = np.zeros(0), np.zeros(0)
        self.missing = 0

    def update(self, v: np.ndarray, rng: np.random.Generator) -> None:
        ok = np.isfinite(v)
        self.missing += int((~ok).sum())
        keys = np.concatenate([self.keys, rng.random(int(ok.sum()))])
        values = np.concatenate([self.values, v[ok]])
        if len(keys) > MEDIAN_SAMPLE:
            keep = np.argpartition(keys, MEDIAN_SAMPLE)[:MEDIAN_SAMPLE]
            keys, values = keys[keep], values[keep]
        self.keys, self.values = keys, values


class _Text:
    def __init__(self):
        self.counts: dict[str, int] = {}
        self.missing = self.numeric = self.seen = 0  # seen, numeric: cells of every row, not only training
        self.capped = False
        self.text_at: tuple[str, Any] | None = None  # (where, value) of the first cell not a number

    def update(self, every: pa.Array, rows: np.ndarray | None, where: Where) -> None:
        """``every``: the column of a chunk (all its rows are checked for text among numbers);
        ``rows``: its training rows (counted)."""
        looks = pc.match_substring_regex(every, NUMBER).fill_null(True).to_numpy(zero_copy_only=False)
        self.numeric += int(looks.sum()) - every.null_count
        self.seen += len(every) - every.null_count
        if self.text_at is None and not looks.all():
            i = int(np.flatnonzero(~looks)[0])
            self.text_at = (where.row(i), every[i].as_py())
        s = every if rows is None else every.filter(pa.array(rows))
        self.missing += s.null_count
        vc = pc.value_counts(s.drop_null())
        for v, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
            if v in self.counts:
                self.counts[v] += n
            elif len(self.counts) < TRACK_CATEGORIES:
                self.counts[v] = n
            else:
                self.capped = True


class _Labels:
    """Every row's label, checked against the stated classes; collects the class names / range."""

    def __init__(self, label: dict, task: str, opts: TableOptions):
        self.column, self.kind, self.task, self.opts = label["column"], label["kind"], task, opts
        self.type = label.get("type")
        self.names: set[str] = set()
        self.max = -1
        self.missing = 0

    def update(self, col, where: Where, policy: str) -> None:
        miss = _label_missing(col)
        if miss.any():
            self.missing += int(miss.sum())
            if policy == "error":
                raise ValueError(f"{where.row(np.flatnonzero(miss)[0])}, column {self.column!r}: no label "
                                 "(empty cell); fill it, or pass --on-bad-rows drop to drop such rows")
        if self.task == "regression":
            return
        if self.kind == "text" and self.opts.labels is None:
            self.names.update(v for v in pc.unique(_combine(col).drop_null()).to_pylist())
            return
        values = encode_labels({"column": self.column, "kind": self.kind, "names": self.opts.labels,
                                "num_classes": self.opts.num_classes}, col, where)
        self.max = max(self.max, int(values[~miss].max(initial=-1)))

    def result(self, where: str) -> dict:
        out = {"column": self.column, "kind": self.kind, "type": self.type}
        if self.task == "regression":
            return {**out, "encoding": "value"}
        if self.opts.labels is not None:
            names = list(self.opts.labels)
        elif self.kind == "text":
            names = sorted(self.names)
        else:
            if self.max < 0 and self.opts.num_classes is None:
                raise ValueError(f"{where}: label column {self.column!r} has no values")
            k = self.opts.num_classes or self.max + 1
            return {**out, "encoding": "index", "names": None, "num_classes": k}
        if not names:
            raise ValueError(f"{where}: label column {self.column!r} has no values")
        return {**out, "encoding": "names", "names": names, "num_classes": len(names)}


class Fitter:
    """Fit a transform in one streaming pass: ``features(train_rows)`` with the training split's
    chunks, ``labels(chunk, where)`` with every chunk (checked against the stated classes)."""

    def __init__(self, plan_: dict, opts: TableOptions, seed: int = 0):
        self.plan, self.opts = plan_, opts
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7AB1E]))
        self.stats = {f["column"]: (_Numbers() if f["kind"] == "number" else _Text()) for f in plan_["features"]}
        self._labels = _Labels(plan_["label"], plan_["task"], opts) if plan_["label"] else None
        self.train_rows = 0

    def labels(self, table: pa.Table, where: Where) -> None:
        if self._labels is not None:
            self._labels.update(table.column(self._labels.column), where, self.opts.missing)

    def features(self, table: pa.Table, where: Where = Where(), rows: np.ndarray | None = None) -> None:
        """``rows``: the training split's rows of ``table`` (a boolean mask; default all of them)."""
        train = table.filter(pa.array(rows)) if rows is not None else table
        self.train_rows += train.num_rows
        for f in self.plan["features"]:
            st = self.stats[f["column"]]
            if f["kind"] == "number":
                st.update(_numbers(train.column(f["column"]), f["column"], where), self.rng)
            else:
                st.update(_text(table.column(f["column"])), rows, where)

    def result(self, where: str = "table", split: str = "train") -> dict:
        features, x_columns = [], []
        impute = self.opts.missing == "impute"
        for f in self.plan["features"]:
            c, st = f["column"], self.stats[f["column"]]
            if f["kind"] == "number":
                if not len(st.values):
                    raise ValueError(f"{where}: column {c!r} has no values in the {split!r} split "
                                     f"({self.train_rows} rows); drop the column or fill it")
                out = {"column": c, "kind": "number", "median": float(np.median(st.values))}
                cols = [c]
            else:
                if not st.counts:
                    raise ValueError(f"{where}: column {c!r} has no values in the {split!r} split "
                                     f"({self.train_rows} rows); drop the column or fill it")
                if st.text_at is not None and st.numeric >= NUMERIC_SHARE * st.seen:
                    at, value = st.text_at
                    raise ValueError(f"{at}, column {c!r}: {value!r} is not a number, though {st.numeric} of "
                                     f"the column's {st.seen} values are; fix the cell (empty or NA is a "
                                     "missing value), or the column is read as text categories")
                mode = min(st.counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
                n = len(st.counts)
                shown = f"{n}{'+' if st.capped else ''} categories"
                if n <= self.opts.max_onehot and not st.capped:
                    cats = sorted(st.counts)
                    out = {"column": c, "kind": "onehot", "categories": cats, "mode": mode,
                           "why": f"{shown} <= --max-onehot {self.opts.max_onehot}: one-hot, "
                                  f"plus {c}={OTHER} for categories unseen in training"}
                    cols = [f"{c}={v}" for v in cats] + [f"{c}={OTHER}"]
                else:
                    b = self.opts.hash_buckets
                    out = {"column": c, "kind": "hashed", "buckets": b, "mode": mode, "categories_seen": n,
                           "why": f"{shown} > --max-onehot {self.opts.max_onehot}: hashed (crc32) into "
                                  f"{b} buckets"}
                    cols = [f"{c}#{j}" for j in range(b)]
            out["missing_in_training"] = st.missing
            out["indicator"] = bool(impute and st.missing)
            features.append(out)
            x_columns += cols + ([f"{c}:missing"] if out["indicator"] else [])
        label = self._labels.result(where) if self._labels else None
        return {"format": FORMAT, "task": self.plan["task"], "label": label, "ids": self.plan["ids"],
                "features": features, "x_columns": x_columns, "missing": self.opts.missing,
                "max_onehot": self.opts.max_onehot, "hash_buckets": self.opts.hash_buckets,
                "fitted_on": {"split": split, "rows": self.train_rows,
                              "label_missing": self._labels.missing if self._labels else 0}}


def fit(table: pa.Table, opts: TableOptions, seed: int = 0, where: str = "table") -> dict:
    """The transform of one in-memory table, every row a training row (tests, small tables)."""
    f = Fitter(plan(table.schema, opts, where), opts, seed)
    f.labels(table, Where(where))
    f.features(table, Where(where))
    return f.result(where)


# ------------------------------------------------------------------------------------ applying
def _combine(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def first_bad_cast(arr: pa.Array, to: pa.DataType) -> tuple[int, Any]:
    """(index, value) of the first element that does not cast to ``to`` (-1, None: none); slow, for errors."""
    for i, v in enumerate(arr.to_pylist()):
        try:
            pa.array([v], arr.type).cast(to)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return i, v
    return -1, None


def _numbers(col, name: str, where: Where, to: pa.DataType = pa.float64()) -> np.ndarray:
    """A column as floats (``to``: float64 for statistics, float32 for features, where a value beyond
    its range is Inf, i.e. missing) with NaN where missing; text that is not a number is refused."""
    arr = _combine(col)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_null(arr.type):
        return np.full(len(arr), np.nan, to.to_pandas_dtype())
    if kind_of(arr.type) == "text":
        arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)
        try:
            arr = arr.cast(pa.float64())
        except pa.ArrowInvalid:
            i, v = first_bad_cast(arr, pa.float64())
            raise ValueError(f"{where.row(i)}, column {name!r}: {v!r} is not a number (the column holds "
                             "numbers in the training data)") from None
    if arr.type != to:
        arr = arr.cast(to, safe=False)
    return arr.to_numpy(zero_copy_only=False)  # read-only when zero-copy


def _text(col) -> pa.Array:
    arr = _combine(col)
    if arr.type != pa.string():
        arr = arr.cast(pa.string())
    return arr


def _label_missing(col) -> np.ndarray:
    arr = _combine(col)
    miss = arr.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_floating(arr.type):
        miss = miss | ~np.isfinite(arr.fill_null(0).to_numpy(zero_copy_only=False))
    return miss


def encode_labels(label: dict, col, where: Where) -> np.ndarray:
    """Class indices (int64; -1 where missing) of a label column; a value outside the stated classes
    is a ValueError naming the file, row and value."""
    arr = _combine(col)
    miss = _label_missing(arr)
    names, name = label.get("names"), label["column"]
    if names is not None:
        text = arr.cast(pa.string()) if kind_of(arr.type) == "number" and pa.types.is_integer(arr.type) \
            else _text(arr) if kind_of(arr.type) == "text" else None
        if text is None:  # floats: whole numbers compared as integers
            v = _whole(arr, miss, where, name)
            text = pa.array([None if m else str(int(x)) for x, m in zip(v, miss)], pa.string())
        idx = pc.index_in(text, value_set=pa.array(names, pa.string())).fill_null(-1).to_numpy(zero_copy_only=False)
        bad = (idx < 0) & ~miss
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where.row(i)}, column {name!r}: label {text[i].as_py()!r} is not one of the "
                             f"classes {','.join(names)} (--labels); fix the row or state every class")
        return idx.astype(np.int64)
    if kind_of(arr.type) == "text":
        raise ValueError(f"{where.file}: label column {name!r} holds text but the classes were recorded "
                         "as indices")
    v = _whole(arr, miss, where, name)
    k = label.get("num_classes")
    bad = ~miss & ((v < 0) | (v >= k if k else False))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        rule = (f"outside the classes 0..{k - 1} (--num-classes {k})" if k and v[i] >= 0 else
                "negative; labels are class indices 0..C-1 (map other values with --labels a,b,c)")
        raise ValueError(f"{where.row(i)}, column {name!r}: label {int(v[i])} is {rule}")
    return np.where(miss, -1, v).astype(np.int64)


def _whole(arr: pa.Array, miss: np.ndarray, where: Where, name: str) -> np.ndarray:
    v = arr.cast(pa.float64()).fill_null(0).to_numpy(zero_copy_only=False) if arr.type != pa.int64() \
        else arr.fill_null(0).to_numpy(zero_copy_only=False)
    if v.dtype.kind == "f":
        bad = ~miss & (v != np.rint(np.where(miss, 0, v)))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where.row(i)}, column {name!r}: label {v[i].item()!r} is not a class index (a "
                             "whole number); for numeric targets pass --task regression")
        v = np.where(miss, 0, v).astype(np.int64)
    return v


def _buckets(s: pa.Array, b: int) -> np.ndarray:
    enc = pc.dictionary_encode(s)
    table = np.array([zlib.crc32(v.encode("utf-8")) % b for v in enc.dictionary.to_pylist()], np.int64)
    idx = enc.indices.fill_null(0).to_numpy(zero_copy_only=False)
    return table[idx] if len(table) else np.zeros(len(s), np.int64)


@dataclass
class Applied:
    x: np.ndarray                 # float32 [n, len(x_columns)]
    y: np.ndarray | None          # int64 class indices / float64 targets (None: no label read)
    drop: np.ndarray              # rows to drop (missing label; missing feature under policy drop)
    imputed: dict[str, int]       # column -> cells imputed
    unseen: dict[str, int]        # one-hot column -> categories not seen in training (-> <other>)


def apply(t: dict, table: pa.Table, where: Where = Where(), policy: str = "impute",
          labels: bool = True) -> Applied:
    """``table`` (with the transform's columns; others are ignored) -> features and labels.

    ``policy``: what a missing feature cell does: impute (the training median/mode; counted), drop
    (the row is marked in ``drop``), error (ValueError naming the row and column). ``hpc infer``
    always imputes: every input row gets a prediction."""
    n = table.num_rows
    x = np.zeros((n, len(t["x_columns"])), np.float32)
    drop = np.zeros(n, bool)
    imputed, unseen = {}, {}
    rows = np.arange(n)
    j = 0
    for f in t["features"]:
        c = f["column"]
        if f["kind"] == "number":
            v = _numbers(table.column(c), c, where, pa.float32())
            miss = ~np.isfinite(v)
            x[:, j] = v
            if miss.any():
                x[miss, j] = f["median"]
            j += 1
        else:
            s = _text(table.column(c))
            miss = s.is_null().to_numpy(zero_copy_only=False)
            if f["kind"] == "onehot":
                cats = f["categories"]
                idx = pc.index_in(s, value_set=pa.array(cats, pa.string())).fill_null(-1).to_numpy(zero_copy_only=False)
                new = (idx < 0) & ~miss
                if new.any():
                    unseen[c] = int(new.sum())
                idx = np.where(new, len(cats), np.where(miss, cats.index(f["mode"]), idx))
                x[rows, j + idx] = 1.0
                j += len(cats) + 1
            else:
                b = np.where(miss, zlib.crc32(f["mode"].encode("utf-8")) % f["buckets"], _buckets(s, f["buckets"]))
                x[rows, j + b] = 1.0
                j += f["buckets"]
        if miss.any():
            if policy == "error":
                _refuse(where, miss, c)
            if policy == "drop":
                drop |= miss
            else:
                imputed[c] = int(miss.sum())
        if f["indicator"]:
            x[:, j] = miss
            j += 1
    assert j == x.shape[1], (j, x.shape)
    y = None
    lab = t.get("label")
    if labels and lab:
        col = table.column(lab["column"])
        miss = _label_missing(col)
        if miss.any():
            if policy == "error":
                raise ValueError(f"{where.row(np.flatnonzero(miss)[0])}, column {lab['column']!r}: no label "
                                 "(empty cell); fill it, or pass --on-bad-rows drop to drop such rows")
            drop |= miss
        if lab["encoding"] == "value":
            y = np.where(miss, 0.0, _numbers(col, lab["column"], where))
        else:
            y = encode_labels(lab, col, where)
            y[miss] = 0
    return Applied(x, y, drop, imputed, unseen)


def _refuse(where: Where, miss: np.ndarray, column: str) -> None:
    raise ValueError(f"{where.row(np.flatnonzero(miss)[0])}, column {column!r}: missing value; fill it, or "
                     "pass --on-bad-rows impute (training median/mode) or drop (the row)")


def refuse_missing(t: dict, table: pa.Table, where: Where) -> None:
    """``--on-bad-rows error``: a ValueError naming the first missing feature or integer-id cell."""
    for f in t["features"]:
        c = f["column"]
        col = table.column(c)
        miss = ~np.isfinite(_numbers(col, c, where)) if f["kind"] == "number" else \
            _text(col).is_null().to_numpy(zero_copy_only=False)
        if miss.any():
            _refuse(where, miss, c)
    for c in shard_ids(t):
        miss = _combine(table.column(c)).is_null().to_numpy(zero_copy_only=False)
        if miss.any():
            _refuse(where, miss, c)


def ids_int64(t: dict, table: pa.Table, where: Where) -> tuple[np.ndarray, np.ndarray]:
    """The integer id columns as an int64 ``[n, k]`` array, and the rows missing one."""
    cols = shard_ids(t)
    out = np.zeros((table.num_rows, len(cols)), np.int64)
    miss = np.zeros(table.num_rows, bool)
    for j, c in enumerate(cols):
        arr = _combine(table.column(c))
        m = arr.is_null().to_numpy(zero_copy_only=False)
        miss |= m
        try:
            out[:, j] = arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            i, v = first_bad_cast(arr, pa.int64())
            raise ValueError(f"{where.row(i)}, column {c!r}: id {v!r} is not an integer") from None
    return out, miss


# ------------------------------------------------------------------------------------ describing
def describe(t: dict) -> list[str]:
    """What the transform does, in lines for the user (printed by `hpc data shard`)."""
    lines = []
    lab = t.get("label")
    if lab is None:
        lines.append("no label: an unlabeled split (`hpc infer` scores it; `hpc train` refuses it)")
    elif lab["encoding"] == "value":
        lines.append(f"label {lab['column']!r}: regression target")
    elif lab["encoding"] == "names":
        shown = ", ".join(f"{n}={i}" for i, n in enumerate(lab["names"][:20]))
        lines.append(f"label {lab['column']!r}: {lab['num_classes']} classes {shown}"
                     + (" ..." if len(lab["names"]) > 20 else "") + " (predictions name them: prediction_label)")
    else:
        lines.append(f"label {lab['column']!r}: class indices 0..{lab['num_classes'] - 1}")
    if t["ids"]:
        auto = [i["column"] for i in t["ids"] if i["auto"]]
        stored = set(shard_ids(t))
        lines.append("id columns (not features; copied into every prediction row): "
                     + ", ".join(i["column"] + ("" if i["column"] in stored else f" ({i['type']}: not stored in "
                                                "shards; `hpc infer --input FILE` carries it)") for i in t["ids"])
                     + (f"; {', '.join(auto)} auto-detected by name (id, *_id): --no-auto-id makes such "
                        "columns features" if auto else ""))
    n_num = sum(f["kind"] == "number" for f in t["features"])
    lines.append(f"features: {len(t['features'])} column(s) ({n_num} numeric) -> x of {len(t['x_columns'])} values")
    for f in t["features"]:
        if f["kind"] != "number":
            lines.append(f"  {f['column']!r}: {f['why']}")
    missing = [f"{f['column']} ({f['missing_in_training']})" for f in t["features"] if f["missing_in_training"]]
    if missing:
        how = {"impute": "imputed with the training median (numbers) / mode (text), plus a missing-indicator "
                         "column", "drop": "rows dropped", "error": "refused"}[t["missing"]]
        lines.append(f"missing cells in the {t['fitted_on']['split']!r} split, {how}: {', '.join(missing[:12])}"
                     + (" ..." if len(missing) > 12 else ""))
    if t["fitted_on"].get("label_missing"):
        lines.append(f"{t['fitted_on']['label_missing']} row(s) without a label dropped")
    return lines
