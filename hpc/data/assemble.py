"""Windows of a rank's epoch plan -> raw batches, in order, with as few copies as possible.

Each window's sample order is fixed by the plan (``RankPlan.window_perm``): output position j of
window w is window-local row perm[j], i.e. row i lands in batch ``(starts[w] + inv[i]) // B`` at
slot ``% B``. Two ways to get it there:

- *scatter* (big rows, e.g. images, in unfiltered shards): one ``os.preadv`` per contiguous run of
  rows in the file whose iovecs point straight at each row's slot in its batch. No window buffer,
  no gather copy: the bytes are copied once, by the kernel, with the GIL released.
- *gather* (small rows, compressed or otherwise HDF5-only data): read the window's segments into a
  reused window buffer, then copy each batch's rows out with one numpy fancy-index per batch.

Rows outside [first step, stop step) (resume, or the tail ``remainder="drop"`` drops) are read
into a scratch row and discarded. Memory: the batches of one window (plus one window buffer for
gathered fields), whatever the data size.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Iterator

import numpy as np

from hpc.data.manifest import Manifest
from hpc.data.shardio import ShardFiles
from hpc.data.shuffle import RankPlan

SCATTER_MIN_ROW_BYTES = 1024  # below this a per-row iovec costs more than the gather copy


class BufferPool:
    """Batch arrays recycled once nobody else holds them (CPython refcount == the pool's own).

    Fresh batch memory is page-faulted in by the first write, which on a busy VM costs more than
    the copy itself; a handed-out array stays referenced (through its torch tensor and any view)
    until the caller drops the batch, and is only reused after that. Arrays come back roughly in
    the order they went out, so each shape's arrays sit in a FIFO and only the oldest few are
    checked (O(1) per batch). Past ``cap`` arrays per shape, new ones are simply allocated.
    """

    def __init__(self, cap: int = 16, tries: int = 4):
        self.cap, self.tries = cap, tries
        self.arrays: dict[tuple, deque] = {}

    def get(self, shape: tuple, dtype) -> np.ndarray:
        key = (shape, np.dtype(dtype).str)
        fifo = self.arrays.setdefault(key, deque())
        for _ in range(min(self.tries, len(fifo))):
            a = fifo[0]
            fifo.rotate(-1)  # the checked array goes to the back either way
            if sys.getrefcount(a) <= 3:  # the deque, `a`, getrefcount's argument
                return a
        a = np.empty(shape, dtype)
        if len(fifo) < self.cap:
            fifo.append(a)
        return a


class BatchAssembler:
    def __init__(self, m: Manifest, plan: RankPlan, batch_size: int, first_step: int, stop_step: int,
                 offsets: np.ndarray, pool: BufferPool | None = None, scatter: bool = True):
        self.m, self.plan, self.bs = m, plan, batch_size
        self.first, self.stop = first_step, stop_step
        self.offsets = offsets
        self.row_bytes = {k: int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
                          for k, s in m.fields.items()}
        self.pending: dict[int, dict[str, np.ndarray]] = {}
        self.buffers: dict[str, np.ndarray] = {}  # gather window buffers, reused
        self.scratch = {k: np.empty((1,) + s.shape, s.dtype) for k, s in m.fields.items()}
        self.pool = pool or BufferPool()
        self.use_scatter = scatter

    def real_rows(self, step: int) -> int:
        return int(min(self.bs, max(0, self.plan.samples - step * self.bs)))

    def _batch(self, step: int) -> dict[str, np.ndarray]:
        b = self.pending.get(step)
        if b is None:
            n = self.real_rows(step)
            b = {k: self.pool.get((n,) + s.shape, s.dtype) for k, s in self.m.fields.items()}
            b["row_id"] = self.pool.get((n,), np.int64)
            self.pending[step] = b
        return b

    def batches(self, files: ShardFiles) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for group in self.groups(files, 1):
            yield from group

    def groups(self, files: ShardFiles, group: int) -> Iterator[list[tuple[int, dict[str, np.ndarray]]]]:
        """The batches in lists of up to ``group`` consecutive ones: a window's read completes many
        batches at once, and handing them to the next thread together saves a thread switch per
        batch (tens of microseconds each, as much as the read of a small batch)."""
        plan, bs = self.plan, self.bs
        nxt = self.first
        n_windows = len(plan.starts) - 1
        w = plan.window_at(nxt * bs) if nxt * bs < plan.samples else n_windows
        out: list[tuple[int, dict[str, np.ndarray]]] = []
        while nxt < self.stop:
            if w < n_windows and plan.starts[w] < self.stop * bs:
                self._fill(files, w)
                done = int(plan.starts[w + 1])
                w += 1
            else:
                done = plan.samples  # nothing left to read: remaining steps are all padding
            while nxt < self.stop and min((nxt + 1) * bs, plan.samples) <= done:
                out.append((nxt, self._batch(nxt)))
                self.pending.pop(nxt, None)
                nxt += 1
                if len(out) == group:
                    yield out
                    out = []
            if out:  # the next window's read would delay these
                yield out
                out = []

    def _fill(self, files: ShardFiles, w: int) -> None:
        plan, bs = self.plan, self.bs
        seg = plan.window_segments(w)
        perm = plan.window_perm(w)
        n = len(perm)
        inv = np.empty(n, np.int64)
        inv[perm] = np.arange(n)
        pos = plan.starts[w] + inv
        step, slot = pos // bs, pos % bs
        valid = (step >= self.first) & (step < self.stop)
        row_id = np.concatenate([np.arange(self.offsets[s] + a, self.offsets[s] + b) for s, a, b in seg.tolist()])
        # Group the window's valid rows by batch (stable: rows keep window order inside a batch).
        rows = np.flatnonzero(valid)
        rows = rows[np.argsort(step[rows], kind="stable")]
        steps, first_idx = np.unique(step[rows], return_index=True)
        groups = np.split(rows, first_idx[1:]) if len(rows) else []
        for k_step, r in zip(steps.tolist(), groups):
            self._batch(k_step)["row_id"][slot[r]] = row_id[r]
        names = list(self.m.fields)
        scatter = [k for k in names if self.use_scatter and self.row_bytes[k] >= SCATTER_MIN_ROW_BYTES
                   and all(files.direct(int(s), k) is not None for s in np.unique(seg[:, 0]))]
        gather = [k for k in names if k not in scatter]
        if gather:
            win = files.read(seg, gather, into=self.buffers)
            for k_step, r in zip(steps.tolist(), groups):
                b = self._batch(k_step)
                for k in gather:
                    if len(r) == len(b[k]):  # the whole batch from this window: take straight in
                        np.take(win[k], r[np.argsort(slot[r])], axis=0, out=b[k], mode="clip")
                    else:
                        b[k][slot[r]] = win[k][r]
        for k in scatter:
            self._scatter(files, k, seg, step, slot, valid)

    def _scatter(self, files: ShardFiles, k: str, seg: np.ndarray, step, slot, valid) -> None:
        scratch = self.scratch[k].reshape(-1)
        # One iovec per row: a row view of its batch's array (iterating a 2-D array yields them
        # in C), or the scratch row when the row is not wanted.
        rows = {st: list(self._batch(st)[k].reshape(self.real_rows(st), -1))
                for st in np.unique(step[valid]).tolist()}
        iov = [rows[st][sl] if ok else scratch
               for st, sl, ok in zip(step.tolist(), slot.tolist(), valid.tolist())]
        i = 0
        for s, a, b in seg.tolist():
            files.read_rows_into(s, k, a, b, iov[i:i + b - a])
            i += b - a
