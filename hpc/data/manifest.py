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
TASK_FIELDS = {
    "classification": {"x": "f", "y": "i"},
    "regression": {"x": "f", "y": "f"},
    "ratings": {"user": "i", "item": "i", "rating": "f"},
}
# Fields fed to the model (normalized when asked); the others are targets.
INPUT_FIELDS = {"classification": ("x",), "regression": ("x",), "ratings": ("user", "item")}


@dataclass(frozen=True)
class FieldSpec:
    dtype: str                 # numpy dtype name, e.g. "float32", "int64"
    shape: tuple[int, ...]     # per-sample shape, () for scalars

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}


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
    task: str
    fields: dict[str, FieldSpec]
    shards: list[ShardInfo]
    class_counts: list[int] | None = None
    num_classes: int | None = None
    num_users: int | None = None
    num_items: int | None = None
    stats: dict[str, dict] = field(default_factory=dict)   # field -> {mean, std, count, per}
    bad_rows: dict[str, Any] = field(default_factory=dict)  # {policy, dropped}
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    path: Path | None = None   # the split directory it was loaded from
    sha256: str | None = None  # of the manifest file's bytes

    def __post_init__(self) -> None:
        where = self.path / MANIFEST_NAME if self.path else "manifest"
        if self.task not in TASKS:
            raise ValueError(f"{where}: task {self.task!r} is not one of {', '.join(TASKS)}")
        for name, kind in TASK_FIELDS[self.task].items():
            spec = self.fields.get(name)
            if spec is None:
                raise ValueError(f"{where}: task {self.task} needs field {name!r}; fields are "
                                 f"{sorted(self.fields)}")
            if np.dtype(spec.dtype).kind not in (kind, "u" if kind == "i" else kind):
                raise ValueError(f"{where}: field {name!r} has dtype {spec.dtype}; task {self.task} "
                                 f"needs a {'float' if kind == 'f' else 'integer'} dtype")

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def sample_counts(self) -> list[int]:
        return [s.samples for s in self.shards]

    @property
    def input_fields(self) -> tuple[str, ...]:
        return INPUT_FIELDS[self.task]

    def shard_path(self, i: int) -> Path:
        p = Path(self.shards[i].file)
        return p if p.is_absolute() or self.path is None else self.path / p

    def schema(self) -> dict:
        """JSON-able input schema: what the registry stores and batch inference compares against."""
        def yielded(dtype: str) -> str:  # what readers yield: ints as int64, floats as float32
            kind = np.dtype(dtype).kind
            return "int64" if kind in "iub" else "float32" if kind == "f" else dtype

        out: dict[str, Any] = {"task": self.task, "fields": {
            k: {"dtype": yielded(v.dtype), "shape": list(v.shape)} for k, v in self.fields.items()}}
        for key in ("num_classes", "num_users", "num_items"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version, "task": self.task,
            "fields": {k: v.to_json() for k, v in self.fields.items()},
            "shards": [s.to_json() for s in self.shards],
            "total_samples": self.total_samples, "class_counts": self.class_counts,
            "num_classes": self.num_classes, "num_users": self.num_users, "num_items": self.num_items,
            "stats": self.stats, "bad_rows": self.bad_rows, "provenance": self.provenance,
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
        fields = {k: FieldSpec(str(v["dtype"]), tuple(int(d) for d in v["shape"]))
                  for k, v in obj["fields"].items()}
        shards = [ShardInfo(str(s["file"]), int(s["samples"]), int(s["bytes"]), str(s["sha256"]),
                            {k: str(v) for k, v in s["datasets"].items()}) for s in obj["shards"]]
        m = Manifest(task=obj["task"], fields=fields, shards=shards,
                     class_counts=obj.get("class_counts"), num_classes=obj.get("num_classes"),
                     num_users=obj.get("num_users"), num_items=obj.get("num_items"),
                     stats=obj.get("stats") or {}, bad_rows=obj.get("bad_rows") or {},
                     provenance=obj.get("provenance") or {}, format_version=version,
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
