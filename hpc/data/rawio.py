"""Chunk reads outside HDF5 and outside the GIL: vectored ``preadv`` straight into numpy memory, and
gzip/lzf chunks read raw and decompressed in place.

HDF5 is only asked *where* each chunk of a dataset lies and how it is stored (``ChunkTable``: one
``chunk_iter`` pass over the B-tree, in the thread that owns the h5py handles). The bytes are then
moved by libc/zlib/lzf calls made through ``ctypes``, which releases the GIL for each call, so
several threads copy or decompress at once (h5py's global lock and HDF5 serialize every read that
goes through them). Each row's destination is a plain address computed with numpy, so a chunk of
rows is one system call whatever the number of rows, with no Python object per row.

- Unfiltered datasets (contiguous, or chunked along the sample axis): ``ChunkTable.runs`` gives
  the file offset of each chunk's part of a row range; ``preadv_runs`` reads runs with one iovec
  per row (each row straight into its slot of its batch) or one per run (into a buffer).
- gzip (deflate) or lzf, optionally after HDF5's byte shuffle: ``decode_chunk`` reads the stored
  chunk with ``pread`` and decompresses it (zlib's ``uncompress``, the ``lzf_decompress`` that h5py
  ships for its own filter) straight into the destination; a chunk that HDF5 stored unfiltered
  (its filter mask says so: the optional filter did not shrink it) is copied as it is.
- Anything else (fletcher32, szip, scale-offset, n-bit, plugins, big-endian, unallocated chunks,
  chunks that split a sample, a platform without ``preadv``, a dataset stored in another file than
  the shard (external link), a file datatype other than the numpy dtype h5py converts it to, a
  full-size chunk stored unfiltered without a filter-mask bit, as
  ``H5D_CHUNK_DONT_FILTER_PARTIAL_CHUNKS`` writes edge chunks): ``ChunkTable.from_dataset`` returns
  None and the caller reads through HDF5.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys

import numpy as np

IOV_MAX = 1024  # iovecs per preadv call (Linux's limit)
MAX_RW = 0x7FFFF000  # bytes one read/preadv moves at most on Linux (MAX_RW_COUNT): asked more, it returns less
FIX_HINT = "run `hpc data verify DIR` on the split; re-copy or re-create the shard"
FILTER_DEFLATE, FILTER_SHUFFLE, FILTER_LZF = 1, 2, 32000
_ADDR = np.uint64  # struct iovec is {void *base; size_t len}: two 64-bit words on LP64


def _libc_preadv():
    if not (sys.platform.startswith("linux") and ctypes.sizeof(ctypes.c_void_p) == 8):
        return None
    try:
        f = ctypes.CDLL(None, use_errno=True).preadv
    except (OSError, AttributeError):
        return None
    f.restype = ctypes.c_ssize_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    return f


def _zlib_uncompress():
    try:
        lib = ctypes.CDLL("libz.so.1")  # Linux's soname; find_library (a subprocess) only if absent
    except OSError:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so")
        except OSError:
            return None
    f = getattr(lib, "uncompress", None)
    if f is None:
        return None
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p, ctypes.c_ulong]
    return f


def _lzf_decompress():
    """liblzf's decompressor as built into h5py for its lzf filter (None where h5py hides it)."""
    try:
        import h5py.h5z

        f = ctypes.CDLL(h5py.h5z.__file__).lzf_decompress
    except (ImportError, OSError, AttributeError):
        return None
    f.restype = ctypes.c_uint
    f.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint]
    return f


_PREADV = _libc_preadv()
_UNCOMPRESS = _zlib_uncompress() if _PREADV else None
_LZF = _lzf_decompress() if _PREADV else None
DECODERS = {FILTER_DEFLATE: _UNCOMPRESS, FILTER_LZF: _LZF}


def available() -> bool:
    """Whether this platform has the lock-free path (Linux, 64-bit, libc ``preadv``)."""
    return _PREADV is not None


def address(a: np.ndarray) -> int:
    """The address of a C-contiguous, writable array's first byte (the caller keeps ``a`` alive)."""
    if not (a.flags.c_contiguous and a.flags.writeable):
        raise ValueError("need a C-contiguous writable array")
    return a.__array_interface__["data"][0]


def iovecs(addresses: np.ndarray, row_bytes: int) -> np.ndarray:
    """``struct iovec[n]`` as a uint64 array ``[n, 2]``: one row of ``row_bytes`` at each address."""
    iov = np.empty((len(addresses), 2), _ADDR)
    iov[:, 0] = addresses
    iov[:, 1] = row_bytes
    return iov


def check_iovecs(iov: np.ndarray) -> int:
    """The address of ``iov`` (a ``iovecs`` array) after checking its type: the iovecs' targets are
    the caller's to keep valid (``address``) while reads run."""
    if iov.ndim != 2 or iov.shape[1] != 2 or iov.dtype != _ADDR:
        raise ValueError("not an iovec array (uint64 [n, 2])")
    return address(iov)


def _short(got: int, want: int, offset: int) -> OSError:
    return OSError(f"short read: {got} of {want} bytes at offset {offset} (file truncated? {FIX_HINT})")


def pread_full(fd: int, bufs: list, offset: int, cap: int = MAX_RW) -> int:
    """Fill the writable buffers ``bufs`` (memoryviews or contiguous arrays) in order from file
    ``offset``: ``os.preadv`` of at most ``cap`` bytes a call, continuing after a partial count
    (the kernel moves at most ``MAX_RW`` bytes a call); only 0 bytes (end of file) is an error.
    Returns the bytes read (the buffers' total). The one place that handles partial reads."""
    views = [memoryview(b).cast("B") for b in bufs]
    views = [v for v in views if len(v)]
    total, start, done = sum(len(v) for v in views), offset, 0
    while views:
        group, room = [], cap
        for v in views[:IOV_MAX]:
            if room <= 0:
                break
            group.append(v[:room])
            room -= len(group[-1])
        try:
            got = os.preadv(fd, group, offset)
        except InterruptedError:
            continue
        if got <= 0:  # end of file
            raise _short(done, total, start)
        done, offset = done + got, offset + got
        while got and views:  # drop what was filled; a partly filled buffer goes on from where it stopped
            n = min(got, len(views[0]))
            views[0] = views[0][n:]
            got -= n
            if not len(views[0]):
                views.pop(0)
    return total


def preadv_runs(fd: int, iov_base: int, n_iov: int, runs, cap: int = MAX_RW) -> None:
    """Runs ``(offset, first, count, row_bytes)`` of ``fd``: ``count`` rows of ``row_bytes`` from file
    ``offset``, row i into iovec ``first + i`` of the ``n_iov`` iovecs at ``iov_base``
    (``check_iovecs``). One system call per run (per 1024 rows, per ``cap`` bytes); the kernel
    copies from the page cache straight into each destination with the GIL released."""
    for offset, first, count, row_bytes in runs:
        if first < 0 or count < 0 or first + count > n_iov:
            raise ValueError(f"preadv: rows {first}:{first + count} outside the {n_iov} iovecs")
        per_call = max(1, min(IOV_MAX, cap // max(row_bytes, 1)))
        done = 0
        while done < count:
            n = min(per_call, count - done)
            want = n * row_bytes
            got = _PREADV(fd, iov_base + (first + done) * 16, n, offset)
            if got < 0:
                e = ctypes.get_errno()
                if e == errno.EINTR:
                    continue
                raise OSError(e, f"preadv: {os.strerror(e)}")
            if got != want:  # partial (a row over the kernel's limit) or end of file: the rest, row by row
                if got == 0:
                    raise _short(0, want, offset)
                whole, part = divmod(got, row_bytes)
                rest = []
                for i in range(first + done + whole, first + done + n):
                    base, length = (int(v) for v in np.frombuffer(
                        (ctypes.c_uint64 * 2).from_address(iov_base + i * 16), np.uint64))
                    skip = part if i == first + done + whole else 0
                    rest.append(memoryview((ctypes.c_char * (length - skip)).from_address(base + skip)).cast("B"))
                pread_full(fd, rest, offset + got, cap)
            done, offset = done + n, offset + want


def pread_into(fd: int, dest: np.ndarray, offset: int, cap: int = MAX_RW) -> None:
    """``dest.nbytes`` bytes from ``offset`` into ``dest`` (C-contiguous), GIL released."""
    if dest.nbytes:
        pread_full(fd, [dest.reshape(-1).view(np.uint8)], offset, cap)


def stored_in(ds, path) -> bool:
    """Whether reading ``ds`` at the addresses HDF5 reports, from the file ``path``, gives its
    values: the dataset lives in that file (not behind an external link) and its file datatype is
    exactly the numpy dtype h5py shows (h5py converts others on read: a 2-byte custom float shown
    as float32, an n-bit integer, ...)."""
    try:
        if not os.path.samefile(ds.file.filename, path):
            return False
        import h5py

        return bool(ds.id.get_type().equal(h5py.h5t.py_create(ds.dtype)))
    except (OSError, TypeError, ValueError):  # a family/split-driver name, a type h5py cannot map back
        return False


class ChunkTable:
    """Where one dataset's chunks lie in its file and how they are stored: enough to read rows
    without HDF5. ``filters`` are the filter ids in the order HDF5 applied them when writing."""

    def __init__(self, rows: int, row_bytes: int, chunk_rows: int, offsets: np.ndarray, sizes: np.ndarray,
                 masks: np.ndarray, filters: tuple[int, ...], itemsize: int):
        self.rows, self.row_bytes, self.chunk_rows = rows, row_bytes, chunk_rows
        self.offsets, self.sizes, self.masks = offsets, sizes, masks
        self.filters, self.itemsize = filters, itemsize
        self.chunk_bytes = chunk_rows * row_bytes
        self.max_stored = int(sizes.max()) if len(sizes) else 0

    @property
    def shuffled(self) -> bool:
        """HDF5's byte shuffle comes first in the pipeline (undoing it needs a scratch chunk)."""
        return self.filters[:1] == (FILTER_SHUFFLE,)

    @property
    def raw(self) -> bool:
        """Unfiltered: rows can be read straight into their destinations (``runs``)."""
        return not self.filters

    @classmethod
    def from_dataset(cls, ds, path=None) -> "ChunkTable | None":
        """The table of an h5py dataset, to be read from the file ``path`` (default: the file
        ``ds`` lives in), or None when it must be read through HDF5."""
        if _PREADV is None or not stored_in(ds, ds.file.filename if path is None else path):
            return None
        dt = ds.dtype
        native = dt.byteorder in ("=", "|") or dt.byteorder == ("<" if np.little_endian else ">")
        if not native or dt.hasobject or dt.kind not in "biuf" or ds.ndim < 1:
            return None
        rows = int(ds.shape[0])
        row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * dt.itemsize
        if ds.chunks is None:  # contiguous: one "chunk" of every row
            offset = ds.id.get_offset()
            if offset is None or rows == 0:  # never written: HDF5 returns fill values
                return None
            one = np.array([offset], np.int64)
            return cls(rows, row_bytes, rows, one, np.array([rows * row_bytes], np.int64), np.zeros(1, np.uint32),
                       (), dt.itemsize)
        if tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):  # a chunk would split a sample
            return None
        filters = cls._filters(ds)
        if filters is None:
            return None
        chunk_rows = int(ds.chunks[0])
        n = -(-rows // chunk_rows)
        offsets = np.full(n, -1, np.int64)
        sizes = np.zeros(n, np.int64)
        masks = np.zeros(n, np.uint32)

        def note(info) -> None:
            c = info.chunk_offset[0] // chunk_rows
            offsets[c], sizes[c], masks[c] = info.byte_offset, info.size, info.filter_mask

        if hasattr(ds.id, "chunk_iter"):  # one pass over the B-tree
            ds.id.chunk_iter(note)
        else:
            for i in range(ds.id.get_num_chunks()):
                note(ds.id.get_chunk_info(i))
        if (offsets < 0).any():  # an unallocated chunk reads as fill values: HDF5 knows them, we do not
            return None
        chunk_bytes = chunk_rows * row_bytes
        if filters and ((masks == 0) & (sizes == chunk_bytes)).any():
            # Filtered by the mask but exactly the unfiltered size: what H5D_CHUNK_DONT_FILTER_PARTIAL_CHUNKS
            # stores for an edge chunk (mask 0, bytes as they are). Ambiguous from here: HDF5 knows.
            return None
        return cls(rows, row_bytes, chunk_rows, offsets, sizes, masks, filters, dt.itemsize)

    @staticmethod
    def _filters(ds) -> tuple[int, ...] | None:
        """Filter ids in write order, or None for a pipeline we cannot undo ourselves: an optional
        byte shuffle followed by gzip or lzf (with its decompressor found), or nothing."""
        plist = ds.id.get_create_plist()
        ids = tuple(int(plist.get_filter(i)[0]) for i in range(plist.get_nfilters()))
        body = ids[1:] if ids[:1] == (FILTER_SHUFFLE,) else ids
        if not body:
            return ids if not ids else None  # shuffle alone: rare, leave it to HDF5
        if len(body) == 1 and DECODERS.get(body[0]) is not None:
            return ids
        return None

    def runs(self, a: int, b: int):
        """``(file offset, first row, rows)`` of each chunk's part of rows [a, b) (unfiltered data)."""
        while a < b:
            c = a // self.chunk_rows
            end = min(b, (c + 1) * self.chunk_rows)
            yield int(self.offsets[c]) + (a - c * self.chunk_rows) * self.row_bytes, a, end - a
            a = end

    def chunk_span(self, c: int) -> int:
        """Rows of chunk ``c`` that hold data (the last chunk may be partly past the end)."""
        return min(self.chunk_rows, self.rows - c * self.chunk_rows)


def decode_chunk(fd: int, t: ChunkTable, c: int, out: np.ndarray, stored: np.ndarray, tmp: np.ndarray) -> None:
    """Chunk ``c`` of a filtered dataset, decoded into ``out`` (uint8, ``t.chunk_bytes``, contiguous).

    ``stored`` (>= ``t.max_stored`` bytes) and ``tmp`` (>= ``t.chunk_bytes``, used only to undo a
    byte shuffle: None where ``t.shuffled`` is False) are the calling thread's scratch buffers.
    Every step releases the GIL."""
    size = int(t.sizes[c])
    shuffled = t.shuffled and not int(t.masks[c]) & 1
    if (out.nbytes != t.chunk_bytes or stored.nbytes < size
            or (shuffled and (tmp is None or tmp.nbytes < t.chunk_bytes))):  # C writes no further
        raise ValueError(f"decode_chunk: buffers of {out.nbytes}/{stored.nbytes}/"
                         f"{None if tmp is None else tmp.nbytes} bytes for a chunk of {t.chunk_bytes} ({size} stored)")
    raw = stored[:size]
    pread_into(fd, raw, int(t.offsets[c]))
    mask = int(t.masks[c])
    target = tmp[:t.chunk_bytes] if shuffled else out
    codec_bit = len(t.filters) - 1  # the compressor is the last filter
    if mask & (1 << codec_bit):  # stored as it is (an optional filter that did not shrink the chunk)
        if size != t.chunk_bytes:
            raise OSError(f"chunk {c}: {size} stored bytes, expected {t.chunk_bytes} unfiltered ({FIX_HINT})")
        np.copyto(target, raw)
    else:
        codec = t.filters[-1]
        if codec == FILTER_DEFLATE:
            n = ctypes.c_ulong(t.chunk_bytes)
            rc = _UNCOMPRESS(address(target), ctypes.byref(n), address(raw), size)
            got = n.value if rc == 0 else -1
        else:
            got = _LZF(address(raw), size, address(target), t.chunk_bytes)
        if got != t.chunk_bytes:
            raise OSError(f"chunk {c}: cannot decompress ({'gzip' if codec == FILTER_DEFLATE else 'lzf'}, "
                          f"{size} stored bytes, got {got} of {t.chunk_bytes}; {FIX_HINT})")
    if shuffled:  # HDF5's shuffle stores byte j of every element together: undo the transpose
        k = t.itemsize
        np.copyto(out.reshape(-1, k), target.reshape(k, -1).T)
