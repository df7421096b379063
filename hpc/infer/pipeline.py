"""The scoring pipeline of one rank: read + normalize (thread) -> compute -> write (thread).

The reader thread runs ``iter_shard`` (in order, no shuffling) and the scorer's ``prepare``
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
import torch

from hpc.data.reader import iter_shard, put_unless_stopped
from hpc.registry.scorers import move


def id_fields(manifest) -> list[str]:
    """Input fields copied to the output: integer scalar model inputs (user, item) and id fields."""
    out = []
    for name, spec in manifest.fields.items():
        scalar_int = spec.shape == () and np.dtype(spec.dtype).kind in "iu"
        is_id = name == "id" or name.endswith("_id")
        if (scalar_int and name in manifest.input_fields) or (is_id and spec.shape == ()):
            out.append(name)
    return out


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


def score_shards(scorer, manifest, shards: list[int], batch_size: int, prefetch: int, top_k: int,
                 model_rec: dict, device: torch.device, publish: Callable[[int, dict], None],
                 progress=None) -> dict:
    """Score ``shards`` in order; ``publish(shard, columns)`` runs on a writer thread;
    ``progress`` (an ``hpc.util.progress.Progress``) advances by each scored batch's rows.

    Returns ``{rows, read_wait_s, write_wait_s}``: the compute thread's time blocked on the reader
    (input-bound) and on the writer (output-bound); both near 0 means compute-bound.
    """
    ids = id_fields(manifest)
    stop = threading.Event()
    batches: queue.Queue = queue.Queue(maxsize=prefetch)
    finished: queue.Queue = queue.Queue(maxsize=2)  # bounded: at most 2 shards' outputs wait
    pin = device.type == "cuda"

    def read() -> None:
        for s in shards:
            for batch in iter_shard(manifest, s, batch_size, normalize=False):
                prepared = scorer.prepare(batch)
                if pin:
                    prepared = _pin(prepared)
                keep = {"index": batch["row"], "row_id": batch["row_id"], **{k: batch[k] for k in ids}}
                if not put_unless_stopped(batches, (s, prepared, keep), stop):
                    return
            if not put_unless_stopped(batches, (s, None, None), stop):
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
            while True:
                t0 = time.perf_counter()
                s, prepared, keep = _get(batches, reader)
                read_wait += time.perf_counter() - t0
                if prepared is None:
                    break
                with torch.inference_mode():
                    out = scorer(move(prepared, device, non_blocking=pin))
                parts.append((keep, out.cpu()))
                if progress is not None:
                    progress.update(len(keep["index"]))
            cols = _columns(s, parts, ids, top_k, model_rec)
            rows += len(cols["index"])
            t0 = time.perf_counter()
            while True:  # hand over to the writer, noticing if it died
                try:
                    finished.put((s, cols), timeout=0.1)
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


def _columns(shard: int, parts: list[tuple[dict, torch.Tensor]], ids: list[str], top_k: int,
             model_rec: dict) -> dict[str, np.ndarray]:
    """One partition's columns from its batches (pure given the tensors)."""
    cat = (lambda k: torch.cat([p[0][k] for p in parts]).numpy()) if parts else (lambda k: np.zeros(0, np.int64))
    out = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0)
    n = len(cat("index"))
    cols: dict[str, np.ndarray] = {"shard": np.full(n, shard, np.int32), "index": cat("index"),
                                   "row_id": cat("row_id")}
    for k in ids:
        cols[k] = cat(k)
    if model_rec["task"] == "classification":
        probs = out.float().reshape(n, -1) if n else torch.zeros(0, model_rec["schema"]["num_classes"])
        cols["prediction"] = probs.argmax(dim=-1).numpy().astype(np.int64)
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
