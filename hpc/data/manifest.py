"""The manifest: the one description of a split of HDF5 shards that every reader trusts.

``DIR/<split>/manifest.json`` records the format version, the task, the fields (dtype and
per-sample shape), every shard (file relative to the split directory, sample count, bytes,
sha256, the HDF5 dataset path of each field), total samples, class counts, per-field
preprocessing statistics (applied by readers, never baked into the data), dropped bad rows and
provenance. It is written last (atomically), so a manifest never points at a partial shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpc.util.io import atomic_write_json, sha256_bytes

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TASKS = ("classification", "ratings", "regression")
# Fields each task must have (name -> numpy dtype kind): the models and the trainer rely on them.
# A float field ("f": features, float targets) may be *stored* compactly (FLOAT_STORAGE); readers
# always yield it as float32, converted after the (compact) read.
TASK_FIELDS = {
    "classification": {"x": "f", "y": "i"},
    "regression": {"x": "f", "y": "f"},
    "ratings": {"user": "i", "item": "i", "rating": "f"},
}
# Fields fed to the model (normalized when asked); the others are targets.
INPUT_FIELDS = {"classification": ("x",), "regression": ("x",), "ratings": ("user", "item")}
# Stored dtypes of a float field. bfloat16 has no HDF5 or numpy type: it is stored as its uint16 bit
# pattern, with ``encoding: bfloat16`` in the field's spec (and an ``encoding`` attribute on the dataset).
COMPACT_DTYPES = ("uint8", "int8", "uint16", "int16", "float16")
FLOAT_STORAGE = COMPACT_DTYPES + ("float32", "float64")
ENCODINGS = {"bfloat16": "uint16"}  # encoding -> the dtype its bits are stored as


@dataclass(frozen=True)
class FieldSpec:
    dtype: str                 # numpy dtype name as stored on disk, e.g. "float32", "uint8", "int64"
    shape: tuple[int, ...]     # per-sample shape, () for scalars
    encoding: str | None = None  # "bfloat16": the uint16 values are bfloat16 bit patterns

    def to_json(self) -> dict:
        out = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.encoding:
            out["encoding"] = self.encoding
        return out

    @property
    def stored(self) -> str:
        """What the bytes hold: the dtype, or the encoding (``bfloat16``)."""
        return self.encoding or self.dtype


def float_storage_problem(spec: FieldSpec) -> str | None:
    """Why ``spec`` cannot hold a float field (features, float targets), or None if it can."""
    if spec.encoding is not None:
        if ENCODINGS.get(spec.encoding) != spec.dtype:
            return (f"encoding {spec.encoding!r} on dtype {spec.dtype} is not one hpc reads "
                    f"(valid: {', '.join(f'{e} stored as {d}' for e, d in ENCODINGS.items())})")
        return None
    if spec.dtype in FLOAT_STORAGE:
        return None
    why = " (its integers are not all exact in float32, which readers yield)" if _kind(spec.dtype) in "iu" else ""
    return (f"dtype {spec.dtype} is not a feature dtype hpc reads{why}; valid are "
            f"{', '.join(FLOAT_STORAGE)} (and bfloat16 written by `hpc data shard --store-dtype bfloat16`)")


def float_fields(task: str, fields: dict[str, FieldSpec]) -> tuple[str, ...]:
    """Fields yielded as float32 whatever their stored dtype: the task's float fields (features,
    float targets, even when stored as uint8/int16/...) and any other float field."""
    of_task = {k for k, kind in TASK_FIELDS.get(task, {}).items() if kind == "f"} | {"x"}  # x: features
    return tuple(k for k, v in fields.items() if k in of_task or v.encoding is not None or _kind(v.dtype) == "f")


def _kind(dtype: str) -> str:
    try:
        return np.dtype(dtype).kind
    except TypeError:
        return "?"


@dataclass(frozen=True)
class ShardInfo:
    file: str                  # relative to the split directory (or absolute, for `hpc data index`)
    samples: int
    bytes: int
    sha256: str
    datasets: dict[str, str]   # field -> HDF5 dataset path inside the file

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Manifest:
    task: str | None           # None: an unlabeled split (features and ids only; `hpc infer` scores it)
    fields: dict[str, FieldSpec]
    shards: list[ShardInfo]
    class_counts: list[int] | None = None
    num_classes: int | None = None
    num_users: int | None = None
    num_items: int | None = None
    stats: dict[str, dict] = field(default_factory=dict)   # field -> {mean, std, count, per}
    bad_rows: dict[str, Any] = field(default_factory=dict)  # {policy, dropped}
    provenance: dict[str, Any] = field(default_factory=dict)
    table: dict | None = None  # the fitted table transform (hpc.data.tabular) of a CSV/Parquet source
    format_version: int = FORMAT_VERSION
    path: Path | None = None   # the split directory it was loaded from
    sha256: str | None = None  # of the manifest file's bytes

    def __post_init__(self) -> None:
        where = self.path / MANIFEST_NAME if self.path else "manifest"
        if self.task is None:  # unlabeled: no target field to check
            return
        if self.task not in TASKS:
            raise ValueError(f"{where}: task {self.task!r} is not one of {', '.join(TASKS)}")
        for name, kind in TASK_FIELDS[self.task].items():
            spec = self.fields.get(name)
            if spec is None:
                raise ValueError(f"{where}: task {self.task} needs field {name!r}; fields are "
                                 f"{sorted(self.fields)}")
            problem = float_storage_problem(spec) if kind == "f" else (
                None if _kind(spec.dtype) in "iu" and spec.encoding is None
                else f"dtype {spec.stored}; task {self.task} needs an integer dtype")
            if problem:
                raise ValueError(f"{where}: field {name!r}: {problem}")

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def sample_counts(self) -> list[int]:
        return [s.samples for s in self.shards]

    @property
    def labeled(self) -> bool:
        return self.task is not None

    @property
    def input_fields(self) -> tuple[str, ...]:
        if self.task is None:
            return tuple(k for k in ("x", "user", "item") if k in self.fields)
        return INPUT_FIELDS[self.task]

    def shard_path(self, i: int) -> Path:
        p = Path(self.shards[i].file)
        return p if p.is_absolute() or self.path is None else self.path / p

    def float_fields(self) -> tuple[str, ...]:
        return float_fields(self.task, self.fields)

    def yield_dtype(self, name: str) -> np.dtype:
        """What readers yield for ``name``: float32 for float fields, int64 for other integers."""
        if name in self.float_fields():
            return np.dtype(np.float32)
        dtype = np.dtype(self.fields[name].dtype)
        return np.dtype(np.int64) if dtype.kind in "iub" else dtype

    def schema(self) -> dict:
        """JSON-able input schema: what the registry stores and batch inference compares against.
        Dtypes are what readers *yield* (float32 features even when stored as uint8), not the stored ones."""
        out: dict[str, Any] = {"task": self.task, "fields": {
            k: {"dtype": self.yield_dtype(k).name, "shape": list(v.shape)} for k, v in self.fields.items()}}
        for key in ("num_classes", "num_users", "num_items"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.table:  # how raw table columns become x (applied again by `hpc infer` on files)
            out["table"] = self.table
        return out

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version, "task": self.task,
            "fields": {k: v.to_json() for k, v in self.fields.items()},
            "shards": [s.to_json() for s in self.shards],
            "total_samples": self.total_samples, "class_counts": self.class_counts,
            "num_classes": self.num_classes, "num_users": self.num_users, "num_items": self.num_items,
            "stats": self.stats, "bad_rows": self.bad_rows, "provenance": self.provenance,
            **({"table": self.table} if self.table else {}), **({} if self.labeled else {"labeled": False}),
        }


def check_schema(schema: dict, manifest: Manifest) -> None:
    """Raise ValueError listing every difference between a stored model schema and this data."""
    mine = manifest.schema()
    problems = []
    for name, spec in schema.get("fields", {}).items():
        have = mine["fields"].get(name)
        if have is None:
            problems.append(f"field {name!r} missing (data has {sorted(mine['fields'])})")
        elif list(have["shape"]) != list(spec["shape"]) or have["dtype"] != spec["dtype"]:
            problems.append(f"field {name!r}: model expects {spec['dtype']}{spec['shape']}, "
                            f"data has {have['dtype']}{have['shape']}")
    for key in ("num_classes", "num_users", "num_items"):
        if key in schema and key in mine and mine[key] > schema[key]:
            problems.append(f"{key}: data has {mine[key]}, model knows {schema[key]}")
    if problems:
        raise ValueError(f"{manifest.path}: data does not match the model's schema: " + "; ".join(problems))


def manifest_from_json(obj: dict, path: Path | None = None, sha256: str | None = None) -> Manifest:
    where = path / MANIFEST_NAME if path else "manifest"
    try:
        version = int(obj["format_version"])
        if version > FORMAT_VERSION:
            raise ValueError(f"{where}: format_version {version} is newer than this hpc reads "
                             f"({FORMAT_VERSION}); upgrade hpc")
        fields = {k: FieldSpec(str(v["dtype"]), tuple(int(d) for d in v["shape"]), v.get("encoding"))
                  for k, v in obj["fields"].items()}
        shards = [ShardInfo(str(s["file"]), int(s["samples"]), int(s["bytes"]), str(s["sha256"]),
                            {k: str(v) for k, v in s["datasets"].items()}) for s in obj["shards"]]
        m = Manifest(task=obj["task"], fields=fields, shards=shards,
                     class_counts=obj.get("class_counts"), num_classes=obj.get("num_classes"),
                     num_users=obj.get("num_users"), num_items=obj.get("num_items"),
                     stats=obj.get("stats") or {}, bad_rows=obj.get("bad_rows") or {},
                     provenance=obj.get("provenance") or {}, table=obj.get("table"), format_version=version,
                     path=path, sha256=sha256)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: malformed manifest (missing or bad key {e})") from None
    if "total_samples" in obj and int(obj["total_samples"]) != m.total_samples:
        raise ValueError(f"{where}: total_samples {obj['total_samples']} != sum of shard samples "
                         f"{m.total_samples}")
    return m


def load_manifest(split_dir: str | os.PathLike) -> Manifest:
    """Load ``split_dir/manifest.json`` (``split_dir`` may also be the manifest file itself)."""
    p = Path(split_dir)
    if p.name == MANIFEST_NAME and p.is_file():
        p = p.parent
    mpath = p / MANIFEST_NAME
    if not mpath.is_file():
        subs = sorted(d.name for d in p.glob(f"*/{MANIFEST_NAME}")) if p.is_dir() else []
        hint = (f"; it holds splits {', '.join(Path(s).parent.name for s in subs)}: pass one of "
                f"{', '.join(str(p / Path(s).parent) for s in subs)}") if subs else ""
        raise ValueError(f"{mpath}: no manifest (write one with `hpc data shard|synth|index`){hint}")
    raw = mpath.read_bytes()
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{mpath}: not valid JSON ({e})") from None
    return manifest_from_json(obj, path=p.resolve(), sha256=sha256_bytes(raw))


def write_manifest(split_dir: str | os.PathLike, manifest: Manifest) -> Path:
    dest = Path(split_dir) / MANIFEST_NAME
    atomic_write_json(dest, manifest.to_json())
    return dest
