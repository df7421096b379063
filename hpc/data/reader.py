"""The streaming reader: per-rank, shuffled, prefetched, exactly resumable batches of torch tensors.

What a rank reads in an epoch is the pure plan of ``hpc.data.shuffle``; ``hpc.data.assemble``
turns its windows (the bounded shuffle buffer, ``shuffle_buffer_mb``) into batches with whole-chunk
reads of the stored bytes (never per-sample fancy indexing on h5py): ``hpc.data.parallelfill``
reads a window with ``io_threads`` threads outside HDF5 and the GIL (``hpc.data.rawio``: preadv
straight into batch slots for unfiltered rows, gzip/lzf chunks decompressed in place), and
``hpc.data.shardio`` (os.preadv, or HDF5) reads what that cannot. Features stored as
uint8/int16/float16/bfloat16 are converted to float32 per batch after the read, then normalized.
Two background threads: one reads, one converts, normalizes and augments; at most ``prefetch``
finished batches wait. Batch arrays are recycled only once nothing references them (a batch the
caller keeps is never overwritten). Handles are opened by the reading thread (never across fork).

Position is (epoch, batches handed out): ``state_dict()`` after the consumer received batch k
resumes at batch k+1 with exactly the batches (and augmentations) an uninterrupted reader yields.
The state is the same on every rank (every rank yields ``batches_per_epoch`` batches), so saving
rank 0's is enough. A different world size or batch size is accepted at an epoch boundary and
refused mid-epoch (ValueError): re-splitting a half-consumed shuffled epoch would need every
rank's consumed set.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from hpc.data import rawio
from hpc.data.assemble import BatchAssembler, BufferPool
from hpc.data.augment import Augment, batch_generator
from hpc.data.integrity import ShardVerifier, check_split, label_problem
from hpc.data.shardio import ShardFiles, ShardReadError, check_shards, yielded
from hpc.data.manifest import Manifest, load_manifest
from hpc.data.normalize import input_stats, normalizer
from hpc.data.parallelfill import ParallelAssembler, default_io_threads
from hpc.data.partition import batches_per_epoch
from hpc.data.shuffle import RankPlan, rank_plan
from hpc.data.writer import block_rows as default_block_rows

STATE_VERSION = 1
__all__ = ["StreamingReader", "iter_shard", "ShardReadError", "check_shards"]


def put_unless_stopped(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put into a bounded queue unless the consumer has stopped (then False: the producer returns)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _threaded(make: Callable[[threading.Event], Iterator], maxsize: int, name: str) -> Iterator:
    """Run the generator ``make(stop)`` in a daemon thread, handing items over through a queue of
    ``maxsize``; an exception in the thread is raised in the consumer; closing this generator sets
    ``stop`` (its own: stages never stop each other silently) and joins the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
    stop = threading.Event()
    gen = make(stop)

    def put(item) -> bool:
        return put_unless_stopped(q, item, stop)

    def work() -> None:
        try:
            for item in gen:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # forwarded to the consumer, which raises it
            put(("error", e))
        finally:
            gen.close()

    t = threading.Thread(target=work, name=name, daemon=True)
    t.start()
    try:
        while True:
            try:
                kind, item = q.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return
                if not t.is_alive() and q.empty():
                    raise RuntimeError(f"{name}: reader thread ended without a result")
                continue
            if kind == "item":
                yield item
            elif kind == "error":
                raise item
            else:
                return
    finally:
        stop.set()
        t.join()


def _stats_for(m: Manifest, normalize: bool | Mapping | None) -> Mapping[str, dict]:
    if normalize is True:
        return input_stats(m.schema(), m.stats)
    if not normalize:
        return {}
    bad = set(normalize) - set(m.fields)
    if bad:
        raise ValueError(f"normalize: stats for unknown field(s) {sorted(bad)}; fields are {sorted(m.fields)}")
    return dict(normalize)


def _to_torch(arrays: Mapping[str, np.ndarray], m: Manifest,
              dtypes: Mapping[str, np.dtype] | None = None) -> dict[str, torch.Tensor]:
    """Integer fields as int64 (float fields are float32 already: ``_floats``). ``dtypes``: the
    manifest's ``yield_dtype`` of each field, when the caller has them already."""
    dtypes = dtypes or {k: m.yield_dtype(k) for k in m.fields}
    return {k: torch.from_numpy(np.ascontiguousarray(v.astype(dtypes[k], copy=False)) if k in dtypes else v)
            for k, v in arrays.items()}


def _floats(arrays: dict[str, np.ndarray], m: Manifest, norm, pool: BufferPool | None = None,
            floats: tuple[str, ...] | None = None) -> dict:
    """Normalize (``norm``) the fields of a batch the caller owns; float fields stored compactly
    (uint8, int16, float16, ...) become float32 in the same pass, into ``pool``'s recycled arrays
    when given (bfloat16 bits are widened first). float32 fields are normalized in place.
    ``floats``: ``m.float_fields()``, when the caller has it already."""
    floats = m.float_fields() if floats is None else floats
    out = {}
    for k, v in arrays.items():
        if k in floats and (v.dtype != np.float32 or m.fields[k].encoding):
            buf = None if pool is None else pool.get(v.shape, np.float32)
            if m.fields[k].encoding:
                v, buf = yielded(m, k, v, buf), None
            else:
                buf = np.empty(v.shape, np.float32) if buf is None else buf
            out[k] = norm(k, v, inplace=True, out=buf)
        else:
            out[k] = norm(k, v, inplace=True)
    return out


class StreamingReader:
    def __init__(self, split_dir: str | os.PathLike, rank: int = 0, world_size: int = 1,
                 batch_size: int = 256, seed: int = 0, shuffle: bool = True, remainder: str = "drop",
                 normalize: bool | Mapping[str, dict] = True, augment: Any = None, prefetch: int = 4,
                 shuffle_buffer_mb: float = 64.0, block_rows: int | None = None,
                 weight_fn: Callable[[np.ndarray, int], np.ndarray] | None = None, direct_io: bool = True,
                 verify: bool = True, io_threads: int | None = None):
        """``weight_fn(row_ids, epoch) -> weights`` (optional) multiplies each sample's weight:
        the hook for bootstrap ensembles (e.g. Poisson(1) multiplicities keyed on row id).
        ``direct_io=False`` reads everything through HDF5 instead of ``os.preadv`` (same batches).
        ``verify``: hash each shard an epoch reads in a background thread against the manifest's
        sha256 (``hpc.data.integrity``); False only for benchmarks. ``io_threads``: threads that read
        a window in parallel outside HDF5 and the GIL (``hpc.data.parallelfill``; default: the
        CPUs this process may use, at most 4; 1 reads in the reading thread alone)."""
        self.manifest = load_manifest(split_dir)
        m = self.manifest
        check_split(m)  # paths, duplicates, symlinks, missing / truncated / mis-schema shards, naming the file
        self.verify = bool(verify)
        self._opened: dict[int, tuple] = {}  # shard -> (size, mtime_ns, ctime_ns, inode) when first seen
        self._verified: set[int] = set()     # shards whose sha256 matched earlier in this run
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        if prefetch < 0:
            raise ValueError(f"prefetch {prefetch}: must be >= 0 (0 = read in the calling thread)")
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.shuffle, self.remainder = int(seed), bool(shuffle), remainder
        self.batches_per_epoch = batches_per_epoch(m.total_samples, world_size, batch_size, remainder)
        self.block_rows = int(block_rows or default_block_rows(m.fields))
        per_sample = sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
                         for s in m.fields.values())
        self.window_samples = max(batch_size, int(shuffle_buffer_mb * (1 << 20)) // max(per_sample, 1))
        self.prefetch = prefetch
        self._norm = normalizer(_stats_for(m, normalize), {k: s.shape for k, s in m.fields.items()})
        self.augment = Augment.parse(augment)
        if isinstance(self.augment, Augment):
            if "x" not in m.fields:
                raise ValueError(f"{m.path}: augment needs an 'x' field; fields are {sorted(m.fields)}")
            self.augment.check(m.fields["x"].shape)
        self.weight_fn = weight_fn
        self.direct_io = bool(direct_io)  # False: every read through HDF5 (for comparison/debugging)
        self.scatter = bool(direct_io)  # big rows straight into their batch slots (tuning knob)
        self.io_threads = default_io_threads() if io_threads is None else int(io_threads)
        if self.io_threads < 1:
            raise ValueError(f"io_threads {io_threads}: must be >= 1")
        # Enough recycled batches for one window's batches plus those queued (groups of up to
        # `prefetch` between the threads, `prefetch` finished) or in the caller's hands.
        self._pool = BufferPool(cap=-(-self.window_samples // batch_size) + 3 * prefetch + 4)
        # float32 batches of compactly stored fields, filled by the batch thread (its own pool:
        # a pool is used by one thread).
        self._out_pool = BufferPool(cap=2 * prefetch + 4)
        self._offsets = np.concatenate([[0], np.cumsum(m.sample_counts)]).astype(np.int64)
        self._chunk_tables: dict = {}  # where each shard's chunks lie, kept across epochs (parallelfill)
        self._float_fields = m.float_fields()  # looked up per batch: computed once
        self._yield_dtypes = {k: m.yield_dtype(k) for k in m.fields}
        self.epoch, self.position = 0, 0

    # -- position ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at batch 0, unless it is the current epoch (keeps a resumed position)."""
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def _config(self) -> dict:
        return {"world_size": self.world_size, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "remainder": self.remainder, "block_rows": self.block_rows,
                "window_samples": self.window_samples}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self.position,
                "batches_per_epoch": self.batches_per_epoch, "manifest_sha256": self.manifest.sha256,
                **self._config()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("manifest_sha256") != self.manifest.sha256:
            raise ValueError(f"{self.manifest.path}: reader state was saved for another data set "
                             f"(manifest sha256 {state.get('manifest_sha256')}, this one is "
                             f"{self.manifest.sha256})")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if batch > 0 and batch == state.get("batches_per_epoch"):  # the epoch was complete
            self.epoch, self.position = epoch, self.batches_per_epoch
            return
        if batch > 0:
            diff = {k: (state.get(k), v) for k, v in self._config().items() if state.get(k) != v}
            if diff:
                raise ValueError("cannot resume mid-epoch (epoch %d, batch %d) with a different reader "
                                 "configuration: %s; resume with the saved values, or from an epoch "
                                 "boundary" % (epoch, batch, ", ".join(f"{k} saved {a} now {b}"
                                                                       for k, (a, b) in diff.items())))
        if not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"reader state batch {batch} outside 0..{self.batches_per_epoch}")
        # A state saved after the last batch stays (epoch, batches_per_epoch): set_epoch(epoch) then
        # keeps it, iterating yields nothing and rolls over, so the epoch is never repeated.
        self.epoch, self.position = epoch, batch

    # -- iteration -----------------------------------------------------------------------------
    def plan(self, epoch: int) -> RankPlan:
        return rank_plan(self.manifest.sample_counts, self.block_rows, self.world_size, self.rank,
                         self.seed, epoch, self.window_samples, self.shuffle)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, start = self.epoch, self.position
        source = self._batches(epoch, start) if self.prefetch == 0 else self._prefetched(epoch, start)
        try:
            for batch in source:
                self.position += 1
                yield batch
        finally:
            source.close()
        if self.position >= self.batches_per_epoch and self.epoch == epoch:
            self.epoch, self.position = epoch + 1, 0

    def _prefetched(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        # Two stages, each a thread: reading (outside the GIL) runs ahead while the previous batches
        # are normalized, augmented and handed over. The reading thread hands over up to `prefetch`
        # batches at a time (one thread switch per group, not per batch).
        raw = _threaded(lambda stop: self._raw_groups(epoch, start, max(1, self.prefetch)), 1, f"hpc-io-r{self.rank}")
        batches = _threaded(lambda stop: (self._finish(a, epoch, step) for group in raw for step, a in group),
                            self.prefetch, f"hpc-batch-r{self.rank}")
        try:
            yield from batches
        finally:
            batches.close()  # joins the batch thread; then nothing iterates `raw` any more
            raw.close()

    def _batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """Everything in the calling thread (``prefetch=0``)."""
        raw = self._raw_groups(epoch, start, 1)
        try:
            for group in raw:
                for step, arrays in group:
                    yield self._finish(arrays, epoch, step)
        finally:
            raw.close()

    def _raw_groups(self, epoch: int, start: int, group: int) -> Iterator[list[tuple[int, dict[str, np.ndarray]]]]:
        """The epoch's raw batches from ``start``, checked, in lists of up to ``group``."""
        plan = self.plan(epoch)
        ver = ShardVerifier(self.manifest, plan.segments[:, 0], self._opened, self._verified) if self.verify else None
        parallel = self.direct_io and self.scatter
        # ShardFiles serves the parallel path HDF5 lookups and reads (its os.preadv path only where
        # rawio is unavailable); otherwise it reads everything.
        files = ShardFiles(self.manifest, direct=self.direct_io and not (parallel and rawio.available()))
        if parallel:  # lock-free parallel reads where the layout allows
            asm = ParallelAssembler(self.manifest, plan, self.batch_size, start, self.batches_per_epoch,
                                    self._offsets, self._pool, io_threads=self.io_threads, name=f"hpc-io-r{self.rank}",
                                    tables=self._chunk_tables)
        else:  # everything through ShardFiles (HDF5 with direct_io=False)
            asm = BatchAssembler(self.manifest, plan, self.batch_size, start,
                                 self.batches_per_epoch, self._offsets, self._pool, scatter=self.scatter)
        try:
            for batches in asm.groups(files, group):
                for step, arrays in batches:
                    if ver is not None:  # the last batch waits until every shard of the epoch verified
                        ver.finish() if step == self.batches_per_epoch - 1 else ver.check()
                    if "y" in arrays:
                        problem = label_problem(self.manifest, arrays["y"], arrays["row_id"], self._offsets)
                        if problem:
                            raise ShardReadError(problem)
                yield batches
        finally:
            if ver is not None:
                ver.close()
            if isinstance(asm, ParallelAssembler):
                asm.close()  # joins its helper threads, closes its descriptors
            files.close()

    def _finish(self, arrays: dict[str, np.ndarray], epoch: int, step: int) -> dict[str, torch.Tensor]:
        m, bs = self.manifest, self.batch_size
        n = len(arrays["row_id"])
        weight = np.ones(n, np.float32)
        if self.weight_fn is not None and n:
            weight *= np.asarray(self.weight_fn(arrays["row_id"], epoch), np.float32)
        if n < bs:  # remainder="pad": zero-weight padding, row_id -1
            pad = bs - n
            arrays = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in arrays.items()}
            arrays["row_id"][n:] = -1
            weight = np.concatenate([weight, np.zeros(pad, np.float32)])
        arrays = _floats(arrays, m, self._norm, self._out_pool, self._float_fields)  # fresh batch arrays: ours
        batch = _to_torch(arrays, m, self._yield_dtypes)
        batch["weight"] = torch.from_numpy(weight)
        if self.augment is not None:
            batch = self.augment(batch, batch_generator(self.seed, epoch, self.rank, step))
        return batch


def iter_shard(split_dir: str | os.PathLike, shard_index: int, batch_size: int,
               normalize: bool | Mapping[str, dict] = True) -> Iterator[dict[str, torch.Tensor]]:
    """Shard ``shard_index`` in order, in batches (the last one short), for batch inference.

    Each batch has the fields plus ``row_id`` (global, manifest order), ``shard_index`` and
    ``row`` (index inside the shard), all int64, and ``weight`` (1.0).
    """
    m = split_dir if isinstance(split_dir, Manifest) else load_manifest(split_dir)
    if not 0 <= shard_index < len(m.shards):
        raise ValueError(f"{m.path}: shard_index {shard_index} outside 0..{len(m.shards) - 1}")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    norm = normalizer(_stats_for(m, normalize), {k: s.shape for k, s in m.fields.items()})
    offset = sum(m.sample_counts[:shard_index])
    files = ShardFiles(m)
    try:
        n = m.shards[shard_index].samples
        for a in range(0, n, batch_size):
            b = min(n, a + batch_size)
            arrays = files.read(np.array([[shard_index, a, b]], np.int64), list(m.fields))
            batch = _to_torch(_floats(arrays, m, norm), m)  # compact dtypes -> float32 after the read
            rows = torch.arange(a, b, dtype=torch.int64)
            batch.update(row=rows, row_id=rows + offset, weight=torch.ones(b - a),
                         shard_index=torch.full((b - a,), shard_index, dtype=torch.int64))
            yield batch
    finally:
        files.close()
