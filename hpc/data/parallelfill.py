"""A window's batches filled by several threads with lock-free reads (``hpc.data.rawio``).

``ParallelAssembler`` is ``assemble.BatchAssembler`` (same plan, same batches in the same order,
same recycled batch arrays) whose window fill bypasses HDF5 and the GIL wherever ``rawio`` can
read the layout, and spreads the reads over ``io_threads`` threads (the reading thread and
``io_threads - 1`` helpers):

- *scatter* fields (unfiltered rows of >= ``SCATTER_MIN_ROW_BYTES``, e.g. images): each row's
  destination (its slot in its batch, or a scratch row for a row this pass does not yield) is
  computed with numpy for the whole window, then each chunk's run of rows is one ``preadv``.
  One copy per byte: page cache -> batch slot, by the kernel.
- *window* fields: gzip/lzf chunks (optionally byte-shuffled, any row size) are read raw and
  decompressed by one thread each straight into the window buffer (through a scratch chunk only
  for a chunk's part, or to undo a shuffle); small unfiltered rows (labels) are read one ``preadv``
  per chunk run into it. Then each batch is one ``np.take`` from the window buffer. Bytes
  written: the decompressed chunk (or the read), then one gather copy.
- layouts rawio leaves to HDF5: the parent's path in the reading thread (``ShardFiles.read``
  into the window buffer), then the same gather.

Helpers never touch HDF5 or ``ShardFiles``: the reading thread looks up every chunk's file offset
(``ChunkTable``, once per shard and field) and owns the file descriptors, which stay open until
every read of the window is done. A window's batches are handed out only after all its reads
finished; a failed read raises ``ShardReadError`` naming the file, in the reading thread.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hpc.data import rawio
from hpc.data.assemble import SCATTER_MIN_ROW_BYTES, BatchAssembler, BufferPool
from hpc.data.manifest import Manifest
from hpc.data.shardio import MAX_OPEN_FILES, ShardFiles, ShardReadError
from hpc.data.shuffle import RankPlan


def default_io_threads() -> int:
    """Threads that read a window: the CPUs this process may run on, at most 4 (the copy is
    bound by memory bandwidth well before that)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


class ParallelAssembler(BatchAssembler):
    def __init__(self, m: Manifest, plan: RankPlan, batch_size: int, first_step: int, stop_step: int,
                 offsets: np.ndarray, pool: BufferPool | None = None, io_threads: int = 1, name: str = "hpc-io",
                 tables: dict | None = None):
        """``tables``: a cache of chunk tables kept across epochs by the caller (an HDF5 lookup of
        every chunk costs about a millisecond per thousand chunks); an entry is used only while
        its shard's (size, mtime, ctime, inode) are those it was made with."""
        super().__init__(m, plan, batch_size, first_step, stop_step, offsets, pool, scatter=True)
        self.io_threads = max(1, int(io_threads))
        self.name = name
        self._executor: ThreadPoolExecutor | None = None
        self._cache = {} if tables is None else tables  # (shard, field) -> (stat, ChunkTable | None)
        self._tables: dict[tuple[int, str], rawio.ChunkTable | None] = {}
        self._stats: dict[int, tuple] = {}
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._local = threading.local()  # per-thread scratch buffers for decoding

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        while self._fds:
            os.close(self._fds.popitem()[1])

    # -- lookups (reading thread only) -----------------------------------------------------------
    def _table(self, files: ShardFiles, shard: int, name: str) -> rawio.ChunkTable | None:
        key = (shard, name)
        if key not in self._tables:
            path = self.m.shard_path(shard)
            try:
                if shard not in self._stats:
                    st = os.stat(path)
                    self._stats[shard] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                hit = self._cache.get(key)
                if hit is not None and hit[0] == self._stats[shard]:
                    self._tables[key] = hit[1]
                else:  # ShardFiles checks the dataset's rows/dtype/shape against the manifest first
                    self._tables[key] = rawio.ChunkTable.from_dataset(files.dataset(shard, name), path)
                    self._cache[key] = (self._stats[shard], self._tables[key])
            except ShardReadError:
                raise
            except Exception as e:  # h5py raises OSError/KeyError/ValueError/RuntimeError
                raise ShardReadError(f"{path}: cannot open ({type(e).__name__}: {e})") from e
        return self._tables[key]

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = self._fds[shard] = os.open(self.m.shard_path(shard), os.O_RDONLY)
            except OSError as e:
                raise ShardReadError(f"{self.m.shard_path(shard)}: cannot open ({e})") from e
        self._fds.move_to_end(shard)
        return fd

    def _trim_fds(self) -> None:
        """Close the least recently used descriptors past the cap (only between windows: a
        window's reads keep theirs open)."""
        while len(self._fds) > MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])

    # -- the window ----------------------------------------------------------------------------------
    def _fill(self, files: ShardFiles, w: int) -> None:
        if not rawio.available():
            return super()._fill(files, w)
        plan, bs = self.plan, self.bs
        seg = plan.window_segments(w)
        perm = plan.window_perm(w)  # output position p0 + j is window row perm[j]
        n, p0 = len(perm), int(plan.starts[w])
        # Positions this pass yields (resume, or the tail remainder="drop" drops, cut the rest):
        lo, hi = max(p0, self.first * bs), min(p0 + n, self.stop * bs)
        steps = list(range(lo // bs, -(-hi // bs))) if hi > lo else []
        # Batch `st` takes positions [max(lo, st*bs), min(hi, (st+1)*bs)): window rows perm[j0:j1],
        # into consecutive slots from s0 = p0 + j0 - st*bs.
        spans = [(st, max(lo, st * bs) - p0, min(hi, (st + 1) * bs) - p0) for st in steps]
        lens = seg[:, 2] - seg[:, 1]  # window rows: the segments' rows back to back
        row_id = np.repeat(self.offsets[seg[:, 0]] + seg[:, 1] - (np.cumsum(lens) - lens), lens) + np.arange(n)
        for st, j0, j1 in spans:
            s0 = p0 + j0 - st * bs
            self._batch(st)["row_id"][s0:s0 + j1 - j0] = row_id[perm[j0:j1]]
        shards = np.unique(seg[:, 0]).tolist()
        scatter, window, hdf5 = [], [], []
        for k in self.m.fields:
            tables = [self._table(files, s, k) for s in shards]
            if any(t is None for t in tables):
                hdf5.append(k)  # a layout rawio leaves to HDF5
            elif all(t.raw for t in tables) and self.row_bytes[k] >= SCATTER_MIN_ROW_BYTES:
                scatter.append(k)
            else:  # compressed, or rows too small for an iovec each (labels): window buffer + gather
                window.append(k)
        if scatter or window:
            for s in shards:  # opened here, used by the helpers, kept open until the reads are done
                self._fd(s)
        tasks: list[tuple] = []
        for k in scatter:
            tasks += self._scatter_tasks(k, seg, perm, p0, lo, hi, steps)
        wins = {}
        for k in window:
            wins[k], more = self._window_tasks(k, seg, n)
            tasks += more
        try:
            self._run(tasks, lambda: wins.update(files.read(seg, hdf5, into=self.buffers)) if hdf5 else None)
        finally:
            self._trim_fds()
        for st, j0, j1 in spans:  # one gather per batch and field
            b, s0 = self._batch(st), p0 + j0 - st * bs
            for k, win in wins.items():
                np.take(win, perm[j0:j1], axis=0, out=b[k][s0:s0 + j1 - j0], mode="clip")  # in range

    def _scatter_tasks(self, k: str, seg: np.ndarray, perm: np.ndarray, p0: int, lo: int, hi: int,
                       steps: list) -> list[tuple]:
        """``preadv`` of each chunk run, each row straight into its batch slot (the iovecs of the
        whole window built with numpy); rows outside [lo, hi) go to a scratch row."""
        rb, bs = self.row_bytes[k], self.bs
        pos = np.empty(len(perm), np.int64)
        pos[perm] = np.arange(p0, p0 + len(perm))  # window row -> output position
        addr = np.full(len(perm), rawio.address(self.scratch[k]), np.uint64)
        if steps:
            arrays = [self._batch(st)[k] for st in steps]
            if any(len(a) != min(bs, self.plan.samples - st * bs) for st, a in zip(steps, arrays)):
                raise AssertionError("scatter: a batch array of the wrong length")  # never write out of bounds
            bases = np.array([rawio.address(a) for a in arrays], np.uint64)
            rows = np.flatnonzero((pos >= lo) & (pos < hi))
            step, slot = np.divmod(pos[rows], bs)
            addr[rows] = bases[step - steps[0]] + slot.astype(np.uint64) * np.uint64(rb)
        iov = rawio.iovecs(addr, rb)
        runs, i = [], 0
        for s, a, b in seg.tolist():
            for offset, first, count in self._tables[(s, k)].runs(a, b):
                runs.append((s, offset, i + first - a, count, rb))
            i += b - a
        return self._run_tasks(k, iov, runs)

    def _run_tasks(self, k: str, iov: np.ndarray, runs: list) -> list[tuple]:
        """``runs`` ((shard, offset, first iovec, count, row bytes)) in a few tasks of consecutive
        runs: few enough that a task's Python overhead is small, enough to share between threads."""
        parts = min(len(runs), 4 * self.io_threads)
        if not parts:
            return []
        cuts = np.linspace(0, len(runs), parts + 1).astype(int).tolist()
        return [(self._read_runs, (k, iov, runs[a:b])) for a, b in zip(cuts, cuts[1:]) if b > a]

    def _read_runs(self, k: str, iov: np.ndarray, runs: list) -> None:
        base, n = rawio.check_iovecs(iov), len(iov)
        for s, offset, first, count, rb in runs:
            try:
                rawio.preadv_runs(self._fds[s], base, n, ((offset, first, count, rb),))
            except Exception as e:
                raise ShardReadError(f"{self.m.shard_path(s)}: read of {k!r} failed ({type(e).__name__}: {e})") from e

    def _window(self, k: str, n: int) -> np.ndarray:
        spec = self.m.fields[k]
        buf = self.buffers.get(k)
        if buf is None or buf.shape[0] < n:
            buf = self.buffers[k] = np.empty((n,) + spec.shape, spec.dtype)
        return buf[:n]

    def _window_tasks(self, k: str, seg: np.ndarray, n: int) -> tuple[np.ndarray, list[tuple]]:
        """The window buffer of field ``k`` and the reads that fill it: one ``preadv`` per chunk run
        of unfiltered shards; one read + decompression per compressed chunk the window needs (once,
        even when several segments of the window share the chunk)."""
        win = self._window(k, n)
        flat = win.reshape(n, -1).view(np.uint8)  # row i: its bytes
        rb = self.row_bytes[k]
        base = rawio.address(flat)
        addrs, runs, pieces, i = [], [], {}, 0
        for s, a, b in seg.tolist():
            t = self._tables[(s, k)]
            if t.raw:  # unfiltered: the rows straight into the window buffer, one iovec per run
                for offset, first, count in t.runs(a, b):
                    runs.append((s, offset, len(addrs), 1, count * rb))
                    addrs.append((base + (i + first - a) * rb, count * rb))
            else:
                cr = t.chunk_rows
                for c in range(a // cr, (b - 1) // cr + 1):
                    lo, hi = max(a, c * cr), min(b, (c + 1) * cr)
                    pieces.setdefault((s, c), (t, []))[1].append((lo - c * cr, hi - c * cr, i + lo - a))
            i += b - a
        tasks = []
        if runs:
            iov = np.array(addrs, np.uint64).reshape(-1, 2)
            tasks += self._run_tasks(k, iov, runs)
        for (s, c), (t, parts) in pieces.items():
            tasks.append((self._decode, (k, s, t, c, parts, flat)))
        return win, tasks

    def _decode(self, k: str, s: int, t: rawio.ChunkTable, c: int, parts: list, flat: np.ndarray) -> None:
        """Chunk ``c`` of shard ``s`` decompressed into the window rows its parts go to (helpers)."""
        try:
            stored, chunk, tmp = self._scratch(t)
            fd = self._fds[s]
            if len(parts) == 1 and parts[0][:2] == (0, t.chunk_rows):  # the whole chunk: straight in
                dest = parts[0][2]
                rawio.decode_chunk(fd, t, c, flat[dest:dest + t.chunk_rows].reshape(-1), stored, tmp)
                return
            rawio.decode_chunk(fd, t, c, chunk, stored, tmp)
            rows = chunk.reshape(t.chunk_rows, -1)
            for lo, hi, dest in parts:
                flat[dest:dest + hi - lo] = rows[lo:hi]
        except Exception as e:
            raise ShardReadError(f"{self.m.shard_path(s)}: read of {k!r} failed ({type(e).__name__}: {e})") from e

    def _scratch(self, t: rawio.ChunkTable) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """This thread's buffers for stored bytes, one decoded chunk, and an unshuffle (grown once;
        the unshuffle buffer only once a shuffled dataset needs it)."""
        have = getattr(self._local, "bufs", None) or (np.empty(0, np.uint8),) * 3
        stored, chunk, tmp = have
        if len(stored) < t.max_stored:
            stored = np.empty(t.max_stored, np.uint8)
        if len(chunk) < t.chunk_bytes:
            chunk = np.empty(t.chunk_bytes, np.uint8)
        if t.shuffled and len(tmp) < t.chunk_bytes:
            tmp = np.empty(t.chunk_bytes, np.uint8)
        self._local.bufs = (stored, chunk, tmp)
        return stored, chunk[:t.chunk_bytes], tmp if t.shuffled else None

    def _run(self, tasks: list[tuple], inline=None) -> None:
        """Run ``tasks`` ((fn, args), each raising ShardReadError naming its file) on the helpers and
        this thread, ``inline()`` (HDF5 reads: this thread only) meanwhile; return when all are
        done, raising the first failure."""
        helpers = min(self.io_threads - 1, len(tasks) - 1)
        if helpers <= 0:
            if inline is not None:
                inline()
            for fn, args in tasks:
                fn(*args)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.io_threads - 1, thread_name_prefix=f"{self.name}-helper")
        it = iter(tasks)
        lock = threading.Lock()
        failed: list[BaseException] = []

        def work() -> None:
            while not failed:
                with lock:
                    task = next(it, None)
                if task is None:
                    return
                try:
                    task[0](*task[1])
                except BaseException as e:
                    failed.append(e)
                    return

        futures = [self._executor.submit(work) for _ in range(helpers)]
        try:
            if inline is not None:
                inline()
        except BaseException as e:
            failed.append(e)
        work()
        for f in futures:
            f.result()  # every read of the window has finished (or stopped) before anything else happens
        if failed:
            raise failed[0]
