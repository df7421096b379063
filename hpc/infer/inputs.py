"""What `hpc infer` scores: a shard split (a directory with manifest.json) or tables (a CSV or
Parquet file, or a directory of them), behind one interface.

Either input has partitions (a shard, or a file: one output partition each) with row counts, an
identity (``sha256``: the manifest's, or of the files' names and contents) that goes into the job
identity, and ``stream(parts, batch_size)``: partition after partition, from its first row, the
batch the scorer prepares, the columns copied into the output (``index``, ``row_id``, id columns)
and, for tables, the cells the recorded transform imputed and the categories it had not seen.

Tables are read with the transform recorded in the model card (``card["schema"]["table"]``, fitted
when the training table was sharded): the same ``hpc.data.tabular.apply`` as at shard time, so a
row scored from its file and from shards made with that transform gets the same prediction.
Columns the transform does not use (the label, if present, among them) are not read.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from hpc.data.manifest import INPUT_FIELDS, TASK_FIELDS, check_schema, load_manifest
from hpc.data.reader import check_shards, iter_shard, put_unless_stopped
from hpc.data.tablefiles import (CHUNK_ROWS, check_columns, chunks, count_rows, header_lines, is_table_input,
                                 read_schema, table_files)
from hpc.data.tabular import Where, apply, read_types, required_columns, shard_ids
from hpc.util.io import sha256_bytes, sha256_file

# Columns `hpc infer` writes itself: an id column of the same name is written as input_<name>.
OUTPUT_COLUMNS = ("shard", "index", "row_id", "prediction", "prediction_label", "probabilities",
                  "top_k_classes", "top_k_probs", "model", "model_version")


TABLE_COLUMNS = "the model's table columns: features and ids"


def out_name(column: str) -> str:
    return f"input_{column}" if column in OUTPUT_COLUMNS else column


def id_fields(manifest) -> list[str]:
    """Shard fields copied to the output: integer scalar model inputs (user, item) and id fields."""
    out = []
    for name, spec in manifest.fields.items():
        scalar_int = spec.shape == () and np.dtype(spec.dtype).kind in "iu"
        is_id = name == "id" or name.endswith("_id")
        if (scalar_int and name in manifest.input_fields) or (is_id and spec.shape == ()):
            out.append(name)
    return out


def _leaf_cards(scorer) -> list[dict]:
    members = getattr(scorer, "members", None)
    if members is None:
        return [scorer.card]
    return [c for m in members for c in _leaf_cards(m)]


def model_transform(scorer, model_rec: dict) -> dict | None:
    """The table transform the model(s) were trained with (None: not trained on a table)."""
    ts = [(c.get("schema") or {}).get("table") for c in _leaf_cards(scorer)]
    if any(t != ts[0] for t in ts[1:]):
        raise ValueError(f"the members of {model_rec['name']} were trained on tables encoded differently "
                         "(their recorded transforms differ), so one table cannot be scored by all of them; "
                         "score shards made for each, or ensemble models trained on the same shards")
    return ts[0]


def label_names(model_rec: dict) -> list[str] | None:
    lab = ((model_rec.get("schema") or {}).get("table") or {}).get("label") or {}
    return lab.get("names") if lab.get("encoding") == "names" else None


def check_input(model_rec: dict, manifest) -> None:
    """The input's fields must be the model's, targets and ids aside (ValueError naming every
    mismatch); a labeled input must have the model's task; shards of a table must have been encoded
    with the model's transform."""
    who = f"model {model_rec['name']}@{model_rec['version']}"
    if manifest.task is not None and manifest.task != model_rec["task"]:
        raise ValueError(f"{manifest.path}: the data's task is {manifest.task}, the {who} was trained for "
                         f"{model_rec['task']}")
    task = model_rec["task"]
    ignored = (set(TASK_FIELDS.get(task, {})) - set(INPUT_FIELDS.get(task, ()))) | {"ids"}
    schema = dict(model_rec["schema"])
    schema["fields"] = {k: v for k, v in schema.get("fields", {}).items() if k not in ignored}
    try:
        check_schema(schema, manifest)
    except ValueError as e:
        raise ValueError(f"{e} ({who})") from None
    mine, theirs = manifest.table, (model_rec["schema"] or {}).get("table")
    if mine and theirs and {k: v for k, v in mine.items() if k != "fitted_on"} != \
            {k: v for k, v in theirs.items() if k != "fitted_on"}:
        raise ValueError(f"{manifest.path}: these shards were encoded by another table transform than the "
                         f"{who}'s (other categories, medians or columns), so their x means something else; "
                         "score the table itself (hpc infer --input FILE applies the model's transform) or "
                         "shard it with `hpc data shard --transform TRAINING_SPLIT`")


class ShardInput:
    kind = "shards"

    def __init__(self, manifest):
        self.manifest = manifest
        self.counts = manifest.sample_counts
        self.weights = self.counts
        self.total = manifest.total_samples
        self.sha256 = manifest.sha256
        self.ids = id_fields(manifest)
        table = manifest.table or {}
        self.table_ids = shard_ids(table) if table and "ids" in manifest.fields else []

    def record(self) -> dict:
        m = self.manifest
        return {"dir": str(m.path), "manifest_sha256": m.sha256, "total_samples": m.total_samples,
                "shards": len(m.shards)}

    def part_record(self, part: int) -> dict:
        return {}

    def stream(self, parts: list[int], batch_size: int) -> Iterator[tuple[int, Any, Any, Any]]:
        """``(part, batch, keep, counts)`` for each batch of ``parts`` in order, and ``(part, None,
        None, None)`` at the end of each part."""
        for part in parts:
            for batch in iter_shard(self.manifest, part, batch_size, normalize=False):
                keep = {"index": batch["row"], "row_id": batch["row_id"], **{k: batch[k] for k in self.ids}}
                for j, name in enumerate(self.table_ids):
                    keep[out_name(name)] = batch["ids"][:, j]
                yield part, batch, keep, None
            yield part, None, None, None


class FileInput:
    """CSV/Parquet files scored with the model's recorded table transform; one partition per file."""
    kind = "files"

    def __init__(self, desc: dict, transform: dict):
        self.desc, self.transform = desc, transform
        self.files = [Path(f["path"]) for f in desc["files"]]
        self.counts = [f["rows"] for f in desc["files"]]
        self.weights = [max(f["rows"], 1) for f in desc["files"]]
        self.total = sum(self.counts)
        self.sha256 = desc["sha256"]
        self.columns = required_columns(transform, labels=False)
        self.types = read_types(transform, labels=False)
        self.ids = [i["column"] for i in transform["ids"]]

    @staticmethod
    def describe(path: str | os.PathLike, transform: dict) -> dict:
        """Rank 0: check every file has the transform's columns; count rows; hash contents."""
        files = table_files(path)
        needed = required_columns(transform, labels=False)
        entries = []
        for f in files:
            check_columns(f, read_schema(f), needed, TABLE_COLUMNS)
            entries.append({"path": str(f.resolve()), "name": f.name, "bytes": f.stat().st_size,
                            "rows": count_rows(f), "sha256": sha256_file(f)})
        ident = [(e["name"], e["sha256"]) for e in entries]
        return {"path": str(Path(path).resolve()), "files": entries,
                "sha256": sha256_bytes(json.dumps(ident).encode())}

    def record(self) -> dict:
        return {"path": self.desc["path"], "kind": "files", "input_sha256": self.sha256,
                "total_samples": self.total, "files": len(self.files)}

    def part_record(self, part: int) -> dict:
        e = self.desc["files"][part]
        return {"input": e["name"], "input_sha256": e["sha256"]}

    def _transformed(self, parts: list[int], batch_size: int) -> Iterator[tuple[int, int, Any, Any]]:
        # Chunks of whole batches, so batches start at the file's row 0 whatever the chunks; the
        # job's very first chunk is one batch, so scoring starts at once.
        per_chunk = max(1, CHUNK_ROWS // batch_size) * batch_size
        for i, part in enumerate(parts):
            path = self.files[part]
            for first, tab in chunks(path, self.columns, self.types, per_chunk,
                                     first_rows=batch_size if i == 0 else None):
                yield part, first, tab, apply(self.transform, tab, Where(str(path), first, header_lines(path)),
                                              "impute", labels=False)
            yield part, 0, None, None

    def stream(self, parts: list[int], batch_size: int) -> Iterator[tuple[int, Any, Any, Any]]:
        """As ``ShardInput.stream``. The next chunks, across files, are read (pyarrow decodes
        without the GIL) and transformed on a thread of their own while these are scored."""
        for part, first, tab, a in ahead(self._transformed(parts, batch_size)):
            if tab is None:
                yield part, None, None, None
                continue
            offset = sum(self.counts[:part])
            x = torch.from_numpy(a.x)
            ids = {out_name(c): tab.column(c).combine_chunks() for c in self.ids}
            index = torch.arange(first, first + tab.num_rows, dtype=torch.int64)
            counts: dict[str, Any] | None = {"imputed": a.imputed, "unseen": a.unseen}
            for b0 in range(0, tab.num_rows, batch_size):
                n = min(batch_size, tab.num_rows - b0)
                keep = {"index": index[b0:b0 + n], "row_id": index[b0:b0 + n] + offset,
                        **{c: v.slice(b0, n) for c, v in ids.items()}}
                yield part, {"x": x[b0:b0 + n]}, keep, counts
                counts = None


def _transform_for(path: str, scorer, model_rec: dict) -> dict:
    transform = model_transform(scorer, model_rec)
    if not transform:
        raise ValueError(f"{path}: a table, but model {model_rec['name']}@{model_rec['version']} was not trained "
                         "on one (its card records no table transform), so nothing says which columns are "
                         "its features; shard the table like its training data and score the shards")
    return transform


def check_before_start(path: str, scorer, model_rec: dict) -> None:
    """The cheap part of ``open_input`` (no hashing, no row counts): a split's schema and shards, or
    a table's columns. `hpc infer --nproc N` runs it before it starts ranks."""
    if not is_table_input(path):
        manifest = load_manifest(path)
        check_input(model_rec, manifest)
        check_shards(manifest)
        return
    needed = required_columns(_transform_for(path, scorer, model_rec), labels=False)
    for f in table_files(path):
        check_columns(f, read_schema(f), needed, TABLE_COLUMNS)


def open_input(path: str, scorer, model_rec: dict, comm) -> ShardInput | FileInput:
    """The input of a job on every rank (ValueError naming the problem, alike on every rank)."""
    if not is_table_input(path):
        manifest = load_manifest(path)
        check_input(model_rec, manifest)
        check_shards(manifest)
        return ShardInput(manifest)
    transform = _transform_for(path, scorer, model_rec)
    state = None
    if comm.world.is_main:
        try:
            state = ("ok", FileInput.describe(path, transform))
        except ValueError as e:
            state = ("error", str(e))
    state = comm.broadcast_object(state, root=0)
    if state[0] == "error":
        raise ValueError(state[1])
    return FileInput(state[1], transform)


def ahead(items: Iterator, depth: int = 1) -> Iterator:
    """``items``, produced on a thread of their own up to ``depth`` ahead; its exception is raised
    here; closing this generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if not put_unless_stopped(q, ("item", item), stop):
                    return
            put_unless_stopped(q, ("end", None), stop)
        except BaseException as e:  # raised in the consumer
            put_unless_stopped(q, ("error", e), stop)

    t = threading.Thread(target=work, name="infer-table-reader", daemon=True)
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        t.join()


def add_counts(total: dict, counts: dict | None) -> dict:
    """Sum per-column counts ({"imputed": {col: n}, "unseen": {col: n}}) into ``total``."""
    for kind, per in (counts or {}).items():
        into = total.setdefault(kind, {})
        for col, n in per.items():
            into[col] = into.get(col, 0) + int(n)
    return total
