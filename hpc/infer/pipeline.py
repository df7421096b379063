"""The scoring pipeline of one rank: read + normalize (thread) -> compute -> write (thread).

The reader thread runs the input's ``stream`` (``hpc.infer.inputs``: a shard or a table file, in
order, no shuffling; tables are transformed there) and the scorer's ``prepare``
(normalization on the CPU, pinned memory for a GPU) up to ``prefetch`` batches ahead; this thread
runs the model; the writer thread publishes one shard's partition while the next is computed.
Queues are bounded (``prefetch`` batches, 2 finished shards), so memory is bounded by shard size.
An exception in either thread is re-raised here; an exception here stops both.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from hpc.data.reader import put_unless_stopped
from hpc.infer.inputs import add_counts, label_names
from hpc.registry.scorers import move


class _Thread(threading.Thread):
    """A daemon thread whose exception is re-raised by ``join_raise`` in the caller."""

    def __init__(self, target: Callable[[], None], name: str):
        super().__init__(name=name, daemon=True)
        self._fn, self.error = target, None

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as e:  # re-raised in the main thread
            self.error = e

    def join_raise(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def _get(q: queue.Queue, thread: _Thread):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if not thread.is_alive():
                thread.join_raise()
                raise RuntimeError(f"{thread.name} thread stopped without finishing")


def score_parts(scorer, source, shards: list[int], batch_size: int, prefetch: int, top_k: int,
                model_rec: dict, device: torch.device, publish: Callable[[int, dict, dict], None],
                progress=None) -> dict:
    """Score the partitions ``shards`` of ``source`` (``hpc.infer.inputs``) in order;
    ``publish(part, columns, counts)`` runs on a writer thread (``counts``: cells a table transform
    imputed, categories it had not seen); ``progress`` (an ``hpc.util.progress.Progress``)
    advances by each scored batch's rows.

    Returns ``{rows, read_wait_s, write_wait_s}``: the compute thread's time blocked on the reader
    (input-bound) and on the writer (output-bound); both near 0 means compute-bound.
    """
    names = label_names(model_rec)
    stop = threading.Event()
    batches: queue.Queue = queue.Queue(maxsize=prefetch)
    finished: queue.Queue = queue.Queue(maxsize=2)  # bounded: at most 2 shards' outputs wait
    pin = device.type == "cuda"

    def read() -> None:
        for s, batch, keep, counts in source.stream(shards, batch_size):
            prepared = None
            if batch is not None:  # else the end of partition s
                prepared = scorer.prepare(batch)
                if pin:
                    prepared = _pin(prepared)
            if not put_unless_stopped(batches, (s, prepared, keep, counts), stop):
                return

    def write() -> None:
        while True:
            item = finished.get()
            if item is None:
                return
            publish(*item)

    reader, writer = _Thread(read, "infer-reader"), _Thread(write, "infer-writer")
    reader.start()
    writer.start()
    rows, read_wait, write_wait = 0, 0.0, 0.0
    try:
        for _ in shards:
            parts: list[tuple[dict, torch.Tensor]] = []
            counted: dict = {}
            while True:
                t0 = time.perf_counter()
                s, prepared, keep, counts = _get(batches, reader)
                read_wait += time.perf_counter() - t0
                if prepared is None:
                    break
                add_counts(counted, counts)
                with torch.inference_mode():
                    out = scorer(move(prepared, device, non_blocking=pin))
                parts.append((keep, out.cpu()))
                if progress is not None:
                    progress.update(len(keep["index"]))
            cols = _columns(s, parts, top_k, model_rec, names)
            rows += len(cols["index"])
            t0 = time.perf_counter()
            while True:  # hand over to the writer, noticing if it died
                try:
                    finished.put((s, cols, counted), timeout=0.1)
                    break
                except queue.Full:
                    if not writer.is_alive():
                        writer.join_raise()
            write_wait += time.perf_counter() - t0
        reader.join_raise()
    finally:
        stop.set()
        while True:
            try:
                finished.put(None, timeout=0.1)
                break
            except queue.Full:
                if not writer.is_alive():
                    break
    t0 = time.perf_counter()
    writer.join_raise()
    write_wait += time.perf_counter() - t0
    return {"rows": rows, "read_wait_s": round(read_wait, 4), "write_wait_s": round(write_wait, 4)}


def _pin(prepared):
    if isinstance(prepared, torch.Tensor):
        return prepared.pin_memory()
    if isinstance(prepared, dict):
        return {k: _pin(v) for k, v in prepared.items()}
    return [_pin(v) for v in prepared]


def _cat(values: list):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values).numpy()
    if isinstance(values[0], pa.Array):  # a table's id column, as the file has it (text, nulls, ...)
        return pa.concat_arrays(values)
    return np.concatenate(values)


def _columns(shard: int, parts: list[tuple[dict, torch.Tensor]], top_k: int, model_rec: dict,
             names: list[str] | None = None) -> dict[str, np.ndarray]:
    """One partition's columns from its batches (pure given the tensors). ``names``: the class
    names (a ``prediction_label`` column)."""
    keys = list(parts[0][0]) if parts else ["index", "row_id"]
    cat = (lambda k: _cat([p[0][k] for p in parts])) if parts else (lambda k: np.zeros(0, np.int64))
    out = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0)
    n = len(cat("index"))
    cols: dict[str, np.ndarray] = {"shard": np.full(n, shard, np.int32), "index": cat("index"),
                                   "row_id": cat("row_id")}
    for k in keys:
        if k not in cols:
            cols[k] = cat(k)
    if model_rec["task"] == "classification":
        probs = out.float().reshape(n, -1) if n else torch.zeros(0, model_rec["schema"]["num_classes"])
        cols["prediction"] = probs.argmax(dim=-1).numpy().astype(np.int64)
        if names:
            cols["prediction_label"] = np.array(names + [None], dtype=object)[
                np.minimum(cols["prediction"], len(names))]
        if top_k:
            k = min(top_k, probs.shape[1])
            val, idx = torch.topk(probs, k, dim=-1)
            cols["top_k_classes"] = idx.numpy().astype(np.int64)
            cols["top_k_probs"] = val.numpy().astype(np.float32)
        else:
            cols["probabilities"] = probs.numpy().astype(np.float32)
    else:
        cols["prediction"] = out.float().reshape(-1).numpy()
    cols["model"] = np.array([model_rec["name"]] * n, dtype=object)
    cols["model_version"] = np.full(n, model_rec["version"], np.int32)
    return cols
