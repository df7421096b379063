"""Shard file access: fail-fast checks, and fast reads of whole chunks / contiguous row ranges.

Reads move the stored bytes (uint8 images stay 1 byte a pixel); ``yielded``/``to_float32`` convert
to what readers yield (float32 features) after the read. Reads never use per-sample fancy indexing
through h5py. For an unfiltered dataset (no compression) whose chunks span whole samples, or a
contiguous one, rows are read with ``os.preadv`` straight into the destination at the byte
offsets HDF5 reports (``H5Dget_chunk_info``/``get_offset``): about twice as fast as an H5Dread per
chunk, and the GIL is released during the copy, so the prefetch thread overlaps the training loop.
Anything else (gzip/lzf, partial chunk layouts, big-endian, unallocated chunks) goes through
HDF5's own read.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import h5py
import numpy as np

from hpc.data import rawio
from hpc.data.manifest import FieldSpec, Manifest

MAX_OPEN_FILES = 64
IOV_MAX = 1024  # iovecs per preadv call (Linux's limit)


class ShardReadError(RuntimeError):
    """A shard failed to read mid-epoch; the message names the file (the job should stop)."""


def to_float32(arr: np.ndarray, spec: FieldSpec, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values -> float32, after the (compact) read: uint8/int8/uint16/int16/float16 and
    bfloat16 bit patterns convert exactly. A float32 array comes back as it is (no copy); else the
    result goes into ``out`` (float32, same shape) when given, a new array otherwise."""
    if spec.encoding == "bfloat16":  # the bits are the top half of a float32's
        res = np.empty(arr.shape, np.float32) if out is None else out
        wide = res.view(np.uint32)
        np.copyto(wide, arr.view(np.uint16), casting="safe")
        np.left_shift(wide, 16, out=wide)
        return res
    if arr.dtype == np.float32:
        return arr
    if out is None:
        return arr.astype(np.float32)
    np.copyto(out, arr, casting="unsafe")
    return out


def yielded(m: Manifest, name: str, arr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A field's stored values as readers yield them (``Manifest.yield_dtype``): float32 for float
    fields whatever the stored dtype, int64 for other integers."""
    if name in m.float_fields():
        return to_float32(arr, m.fields[name], out)
    return arr.astype(m.yield_dtype(name), copy=False)


def dataset_problem(path, dpath: str, ds, spec: FieldSpec, samples: int, name: str) -> str | None:
    """What is wrong with ``ds`` (dataset ``dpath`` of shard ``path``, None if absent) for field
    ``name``, or None."""
    where = f"{path}:{dpath}"
    if not isinstance(ds, h5py.Dataset):
        return f"{path}: no dataset {dpath} (field {name!r})"
    if ds.dtype.name != spec.dtype or tuple(ds.shape[1:]) != spec.shape:
        return (f"{where} is {ds.dtype}{list(ds.shape[1:])}, manifest says {spec.dtype}{list(spec.shape)} "
                f"(field {name!r})")
    if ds.shape[0] != samples:  # fewer: truncated; more: a lowered count hides rows
        return f"{where} has {ds.shape[0]} rows, manifest says {samples} (field {name!r})"
    return None


def check_shards(m: Manifest, schema: bool = True) -> None:
    """Fail fast with every problem named: missing or truncated files, wrong datasets/dtypes/shapes."""
    problems = []
    for i, info in enumerate(m.shards):
        path = m.shard_path(i)
        try:
            size = os.path.getsize(path)
        except OSError:
            problems.append(f"{path}: missing")
            continue
        if size != info.bytes:
            problems.append(f"{path}: size {size} bytes, manifest says {info.bytes} (truncated or replaced)")
            continue
        if not schema:
            continue
        try:
            with h5py.File(path, "r") as f:
                for name, spec in m.fields.items():
                    dpath = info.datasets.get(name, "/" + name)
                    problem = dataset_problem(path, dpath, f.get(dpath), spec, info.samples, name)
                    if problem:
                        problems.append(problem)
        except OSError as e:
            problems.append(f"{path}: not a readable HDF5 file ({e})")
    if problems:
        raise ValueError(f"{m.path}: {len(problems)} bad shard(s):\n  " + "\n  ".join(problems))


class _Direct:
    """Byte layout of one unfiltered dataset: rows [a, b) are ``(b - a) * row_bytes`` contiguous bytes
    at ``offset_of(a)`` as long as they stay inside one chunk (or anywhere, for contiguous data)."""

    def __init__(self, ds: h5py.Dataset):
        self.row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
        self.rows = ds.shape[0]
        if ds.chunks is None:
            self.chunk_rows, self.offsets = self.rows or 1, np.array([ds.id.get_offset()], dtype=object)
            if self.offsets[0] is None:  # never written: HDF5 returns fill values
                raise LookupError
            return
        self.chunk_rows = ds.chunks[0]
        self.offsets = np.full(-(-self.rows // self.chunk_rows), -1, np.int64)
        def note(info) -> None:
            self.offsets[info.chunk_offset[0] // self.chunk_rows] = info.byte_offset

        if hasattr(ds.id, "chunk_iter"):  # one pass over the B-tree: ~5x faster than by index
            ds.id.chunk_iter(note)
        else:
            for i in range(ds.id.get_num_chunks()):
                note(ds.id.get_chunk_info(i))

    @staticmethod
    def usable(ds: h5py.Dataset, path) -> bool:
        """Whether rows of ``ds`` can be read with ``os.preadv`` from the file ``path``."""
        if not rawio.stored_in(ds, path):  # an external link, or a file type h5py converts on read
            return False
        dt = ds.dtype
        native = dt.byteorder in ("=", "|") or dt.byteorder == ("<" if np.little_endian else ">")
        whole_rows = ds.chunks is None or tuple(ds.chunks[1:]) == tuple(ds.shape[1:])
        return (hasattr(os, "preadv") and native and whole_rows and not dt.hasobject and dt.kind in "biuf"
                and ds.compression is None and not ds.shuffle and not ds.fletcher32 and ds.scaleoffset is None)

    def _runs(self, a: int, b: int):
        """``(file offset, rows)`` of each chunk's part of rows [a, b), in order; offset -1 where the
        chunk is unallocated (never written: HDF5 returns its fill value, we cannot)."""
        while a < b:
            c = a // self.chunk_rows
            end = min(b, (c + 1) * self.chunk_rows)
            base = int(self.offsets[c])
            yield (base + (a - c * self.chunk_rows) * self.row_bytes if base >= 0 else -1), end - a
            a = end

    def read_iov(self, fd: int, a: int, b: int, iov: list) -> bool:
        """Rows [a, b), row i into buffer ``iov[i - a]`` (scatter: one syscall per chunk run)."""
        i = 0
        for offset, n in self._runs(a, b):
            if offset < 0:
                return False
            for g in range(i, i + n, IOV_MAX):
                group = iov[g:min(g + IOV_MAX, i + n)]
                offset += _preadv(fd, group, offset, len(group) * self.row_bytes)
            i += n
        return True

    def read(self, fd: int, a: int, b: int, dest: np.ndarray) -> bool:
        """Rows [a, b) into ``dest``; False if a chunk is unallocated (caller falls back to HDF5)."""
        view = memoryview(dest.reshape(-1).view(np.uint8))
        pos = 0
        for offset, n in self._runs(a, b):
            if offset < 0:
                return False
            pos += _preadv(fd, [view[pos:pos + n * self.row_bytes]], offset, n * self.row_bytes)
        return True


def _preadv(fd: int, buffers: list, offset: int, want: int) -> int:
    got = rawio.pread_full(fd, buffers, offset)
    if got != want:  # the buffers' total: a caller's bug, not the file's
        raise ValueError(f"preadv: buffers of {got} bytes, expected {want}")
    return got


class ShardFiles:
    """Lazily opened, LRU-capped handles of one manifest's shards (owned by one thread)."""

    def __init__(self, m: Manifest, direct: bool = True):
        self.m, self.use_direct = m, direct
        self.open: OrderedDict[int, tuple] = OrderedDict()

    def _entry(self, shard: int) -> tuple:
        entry = self.open.get(shard)
        if entry is None:
            path = self.m.shard_path(shard)
            f = h5py.File(path, "r")
            # Dataset objects are cached: a path lookup costs about as much as reading a 1 MB chunk.
            info = self.m.shards[shard]
            dss = {k: f.get(info.datasets.get(k, "/" + k)) for k in self.m.fields}
            # Checked again at every open: a shard replaced since the split was opened (verify=False)
            # must not yield fill values, or rows past its end.
            problems = [p for k, ds in dss.items()
                        if (p := dataset_problem(path, info.datasets.get(k, "/" + k), ds, self.m.fields[k],
                                                 info.samples, k))]
            if problems:
                f.close()
                raise ShardReadError(f"{'; '.join(problems)}: the shard changed since the split was "
                                     f"opened? {rawio.FIX_HINT}")
            direct = {}
            if self.use_direct:
                for k, ds in dss.items():
                    try:
                        direct[k] = _Direct(ds) if _Direct.usable(ds, path) else None
                    except (LookupError, RuntimeError, ValueError):
                        direct[k] = None
            fd = os.open(path, os.O_RDONLY) if any(direct.values()) else -1
            entry = self.open[shard] = (f, dss, direct, fd)
            if len(self.open) > MAX_OPEN_FILES:
                self._close(self.open.popitem(last=False)[1])
        self.open.move_to_end(shard)
        return entry

    def dataset(self, shard: int, name: str) -> h5py.Dataset:
        return self._entry(shard)[1][name]

    def direct(self, shard: int, name: str) -> "_Direct | None":
        try:
            return self._entry(shard)[2].get(name)
        except Exception as e:
            raise ShardReadError(f"{self.m.shard_path(shard)}: cannot open ({type(e).__name__}: {e})") from e

    def read_rows_into(self, shard: int, name: str, a: int, b: int, iov: list) -> None:
        """Rows [a, b) of a direct-readable field, row i into the writable buffer ``iov[i - a]``."""
        try:
            _, dss, direct, fd = self._entry(shard)
            if not direct[name].read_iov(fd, a, b, iov):  # an unallocated chunk: let HDF5 fill it
                tmp = np.empty((b - a,) + dss[name].shape[1:], dss[name].dtype)
                self._read_rows(dss[name], a, b, tmp)
                flat = tmp.reshape(b - a, -1).view(np.uint8)
                for i, dest in enumerate(iov):
                    dest[:] = flat[i].tobytes()
        except Exception as e:
            raise ShardReadError(f"{self.m.shard_path(shard)}: read of rows {a}:{b} of {name!r} failed "
                                 f"({type(e).__name__}: {e})") from e

    def read(self, segments: np.ndarray, names, into: dict | None = None) -> dict[str, np.ndarray]:
        """Read segments (shard, start, stop) back to back into fresh arrays, or into the arrays of
        ``into`` (grown when too small; reusing them saves re-faulting a window's pages each time,
        which costs more than the read on a busy VM)."""
        n = int((segments[:, 2] - segments[:, 1]).sum()) if len(segments) else 0
        out = {}
        for k in names:
            shape, dtype = (n,) + self.m.fields[k].shape, self.m.fields[k].dtype
            buf = into.get(k) if into is not None else None
            if buf is None or buf.shape[0] < n:
                buf = np.empty(shape, dtype)
                if into is not None:
                    into[k] = buf
            out[k] = buf[:n]
        pos = 0
        for shard, a, b in segments.tolist():
            try:
                _, dss, direct, fd = self._entry(shard)
                for k in names:
                    dest = out[k][pos:pos + b - a]
                    d = direct.get(k)
                    if not (d is not None and d.read(fd, a, b, dest)):
                        self._read_rows(dss[k], a, b, dest)
            except Exception as e:  # h5py raises OSError/KeyError/ValueError/RuntimeError
                raise ShardReadError(f"{self.m.shard_path(shard)}: read of rows {a}:{b} failed "
                                     f"({type(e).__name__}: {e})") from e
            pos += b - a
        return out

    @staticmethod
    def _read_rows(ds: h5py.Dataset, a: int, b: int, dest: np.ndarray) -> None:
        """Rows [a, b) through HDF5 (low-level API: the high-level read_direct builds two selection
        objects per call, ~15 % of the time of a 1 MB chunk read)."""
        if b <= a:
            return
        fspace = ds.id.get_space()
        fspace.select_hyperslab((a,) + (0,) * (ds.ndim - 1), (b - a,) + ds.shape[1:])
        ds.id.read(h5py.h5s.create_simple(dest.shape), fspace, dest)

    @staticmethod
    def _close(entry: tuple) -> None:
        entry[0].close()
        if entry[3] >= 0:
            os.close(entry[3])

    def close(self) -> None:
        for entry in self.open.values():
            self._close(entry)
        self.open.clear()
