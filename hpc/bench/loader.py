"""`hpc bench loader`: the streaming reader vs raw h5py reads, the practical limit of a shuffled
read, and a naive per-sample Dataset.

Measured in one run on the same shards, each after one untimed warm-up pass (so all read from the
same page-cache state), in interleaved repeats, medians printed: (a) raw sequential ``read_direct``
of whole shard datasets into one buffer: one copy, no shuffle, the limit; (b) the *practical
limit* of a shuffled read: the reader's own plan (rank 0 of 1, seed 0), each window's chunks read
raw (``ShardFiles.read``: ``os.preadv`` for unfiltered data, HDF5 otherwise) into a window buffer,
then one ``np.take`` per batch into a ring of reused batch buffers, in one thread, no torch;
(c) ``StreamingReader`` (shuffled, prefetch threads, no normalization/augmentation) with its
default ``io_threads`` and with one, and with ``direct_io=False`` (every read through HDF5);
(d) a map-style torch Dataset reading one sample per ``__getitem__`` through h5py, under a
DataLoader (handles opened per worker). (e) The same images stored as uint8 (quantized from the
data's statistics unless already uint8, as ``--store-dtype uint8`` stores them): raw, practical
limit and reader again, moving 4x fewer bytes (the reader yields float32, converted per batch).
(f) Compact dtypes with normalization: the first ``--compact-samples`` images as uint8 and as
float32 shards of the same values, each read by the reader with normalization, as a trainer reads.
(g) Content checks (see ``_integrity``). Then, in child processes, peak RSS while streaming a
synthetic image data set of each ``--rss-gb`` size (generated chunk by chunk, then deleted).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hpc.util.io import atomic_write_json
from hpc.util.table import emit

# Heavy imports (torch ~1.6-2.3 s, mpi4py's MPI init ~1.1 s, and hpc.data/models/train/infer, which
# import torch) stay inside the functions: `hpc --help` imports every bench module to list it.


def register(sub) -> None:
    p = sub.add_parser("loader", help="streaming reader vs raw h5py vs naive per-sample Dataset; peak RSS")
    p.add_argument("--data", required=True, help="a split directory (or a data set with a train/ split)")
    p.add_argument("--json", default=None, help="write raw figures and ratios here")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3, help="interleaved passes of each loader; medians are printed")
    p.add_argument("--naive-samples", type=int, default=20000,
                   help="samples the naive loader reads (it is slow; its rate is per sample)")
    p.add_argument("--naive-workers", type=int, default=0, help="DataLoader workers of the naive loader")
    p.add_argument("--rss-gb", default="1,10", help="sizes (GB) of the synthetic sets streamed for peak RSS; "
                   "'' to skip")
    p.add_argument("--rss-dir", default=None, help="where to generate them (default: a temp dir in /tmp)")
    p.add_argument("--compact-samples", type=int, default=20000,
                   help="images copied to uint8 and float32 shard sets (in --rss-dir) for the compact-dtype "
                        "rows; 0 to skip")
    p.add_argument("--uint8-samples", type=int, default=-1,
                   help="rows of the data copied as uint8 for the uint8 rows of the main table (-1: all; 0 to skip)")
    p.add_argument("--integrity-samples", type=int, default=20000,
                   help="rows copied (whole shards) plain and with fletcher32 for the content-check rows; 0 to skip")
    p.set_defaults(func=run)


def _split(path: str) -> Path:
    p = Path(path)
    return p / "train" if not (p / "manifest.json").exists() and (p / "train" / "manifest.json").exists() else p


def _raw_buffers(m) -> dict:
    """One shard-sized buffer per field, touched before timing: on a busy VM faulting in fresh
    pages costs more than the read itself, and the limit we want is the read."""
    biggest = max(m.sample_counts)
    return {k: np.ones((biggest,) + s.shape, s.dtype) for k, s in m.fields.items()}


def _raw(m, bufs: dict) -> tuple[int, int, float]:
    import h5py

    t0, nbytes, n = time.perf_counter(), 0, 0
    for i, info in enumerate(m.shards):
        with h5py.File(m.shard_path(i), "r") as f:
            for name in m.fields:
                ds, buf = f[info.datasets[name]], bufs[name]
                ds.read_direct(buf, np.s_[0:info.samples], np.s_[0:info.samples])
                nbytes += buf[:info.samples].nbytes
        n += info.samples
    return n, nbytes, time.perf_counter() - t0


def _reader(split: Path, batch_size: int, direct_io: bool = True, normalize: bool = False,
            verify: bool = False, io_threads: int | None = None) -> tuple[int, float]:
    """One pass of a new StreamingReader. ``verify=False`` by default: the read path is what the
    other rows compare; the content check's cost (the first epoch of a run hashes every shard it
    reads) has rows of its own (``_integrity``)."""
    from hpc.data import StreamingReader

    r = StreamingReader(split, 0, 1, batch_size, seed=0, normalize=normalize, remainder="pad", direct_io=direct_io,
                        verify=verify, io_threads=io_threads)
    t0, n = time.perf_counter(), 0
    for b in r:
        n += int(b["weight"].count_nonzero())
    return n, time.perf_counter() - t0


def _practical(split: Path, batch_size: int, ring: list) -> tuple[int, float]:
    """The practical limit of a shuffled read: the reader's plan (rank 0 of 1, seed 0, its windows
    and sample order), each window's chunks read raw into a reused window buffer, then one
    ``np.take`` per batch into ``ring`` (reused, pre-touched batch buffers): the chunk read plus one
    gather copy, in one thread, without threads, torch or per-batch bookkeeping."""
    from hpc.data import StreamingReader
    from hpc.data.shardio import ShardFiles

    r = StreamingReader(split, 0, 1, batch_size, seed=0, remainder="pad", verify=False, prefetch=0)
    m, names = r.manifest, list(r.manifest.fields)
    t0, n, j, bufs = time.perf_counter(), 0, 0, {}
    plan = r.plan(0)
    files = ShardFiles(m)
    try:
        for w in range(len(plan.starts) - 1):
            win = files.read(plan.window_segments(w), names, into=bufs)
            perm = plan.window_perm(w)
            for a in range(0, len(perm), batch_size):
                idx, out = perm[a:a + batch_size], ring[j % len(ring)]
                for k in names:
                    np.take(win[k], idx, axis=0, out=out[k][:len(idx)])
                n, j = n + len(idx), j + 1
    finally:
        files.close()
    return n, time.perf_counter() - t0


def _ring(m, batch_size: int, k: int = 4) -> list:
    return [{name: np.ones((batch_size,) + s.shape, s.dtype) for name, s in m.fields.items()} for _ in range(k)]


def _medians(cases: dict, repeat: int) -> dict:
    """Each case (``name -> () -> (samples, seconds)``) once untimed, then ``repeat`` interleaved
    timed passes (on a shared machine a neighbour's burst hits one pass, not one side of a ratio);
    the median of each."""
    for f in cases.values():
        f()
    times: dict = {k: [] for k in cases}
    n = {}
    for _ in range(max(1, repeat)):
        for k, f in cases.items():
            n[k], t = f()
            times[k].append(t)
    return {k: {"samples": n[k], "seconds": float(np.median(times[k])), "all_seconds": times[k]} for k in cases}


class NaiveH5Dataset:
    """The baseline: one h5py read per sample (what a first map-style Dataset usually does)."""

    def __init__(self, m):
        self.m, self.files = m, None
        self.ends = np.cumsum(m.sample_counts)

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, i: int):
        import h5py
        import torch

        if self.files is None:  # opened lazily, in each worker after fork
            self.files = [h5py.File(self.m.shard_path(s), "r") for s in range(len(self.m.shards))]
        s = int(np.searchsorted(self.ends, i, side="right"))
        row = i - (int(self.ends[s - 1]) if s else 0)
        f, ds = self.files[s], self.m.shards[s].datasets
        return {k: torch.as_tensor(f[ds[k]][row]) for k in self.m.fields}


def _naive(m, batch_size: int, samples: int, workers: int) -> tuple[int, float]:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    ds = NaiveH5Dataset(m)
    sampler = RandomSampler(ds, num_samples=min(samples, len(ds)), generator=torch.Generator().manual_seed(0))
    dl = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for b in dl:
        n += len(next(iter(b.values())))
    return n, time.perf_counter() - t0


def _vm(key: str) -> float:
    """MB of a /proc/self/status entry (VmHWM = peak RSS of this process image; ru_maxrss would
    include the parent's RSS inherited across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_child(split: str, batch_size: int) -> None:
    from hpc.data import StreamingReader

    r = StreamingReader(split, 0, 1, batch_size, normalize=True, remainder="pad")
    before = _vm("VmRSS")
    t0, n, samples = time.perf_counter(), 0, []
    for i, b in enumerate(r):
        n += len(b["weight"])
        if i % 200 == 0:
            samples.append(_vm("VmRSS"))
    print(json.dumps({"samples": n, "seconds": time.perf_counter() - t0, "peak_rss_mb": _vm("VmHWM"),
                      "rss_before_mb": before, "rss_mid_epoch_mb": samples}))


def _rss(gb: float, where: str | None, batch_size: int) -> dict:
    from hpc.data import SynthConfig, WriterConfig, synth

    root = Path(tempfile.mkdtemp(prefix=f"hpc-rss-{gb:g}gb-", dir=where))
    try:
        samples = int(gb * 1e9 // (3 * 32 * 32 * 4 + 8))
        t0 = time.perf_counter()
        synth(SynthConfig(kind="images", samples=samples), root, split="train=1", writer=WriterConfig())
        gen_s = time.perf_counter() - t0
        out = subprocess.run([sys.executable, "-m", "hpc.bench.loader", "--rss-child", str(root / "train"),
                              str(batch_size)], capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res.update(gb=gb, generate_seconds=gen_s, bytes=sum(f.stat().st_size for f in (root / "train").iterdir()))
        return res
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _compact_sets(m, root: Path, samples: int, dtypes=("uint8", "float32")) -> dict[str, Path]:
    """The first ``samples`` rows of ``m`` as shard sets holding the same values, one per dtype of x:
    uint8 (quantized, 128 + 32 sigma, from the data's statistics unless already uint8), float32."""
    from hpc.data import FieldSpec, ShardWriter
    from hpc.data.normalize import input_stats, normalizer
    from hpc.data.reader import iter_shard

    norm = normalizer(input_stats(m.schema(), m.stats), {k: s.shape for k, s in m.fields.items()})
    ytype = m.schema()["fields"]["y"]["dtype"]
    writers = {d: ShardWriter(root / d, m.task, {"x": FieldSpec(d, m.fields["x"].shape), "y": FieldSpec(ytype, ())},
                              source="bench") for d in dtypes}
    left = samples
    for s in range(len(m.shards)):
        for b in iter_shard(m, s, 4096, normalize=False):
            x = b["x"].numpy()[:left]
            if m.fields["x"].dtype != "uint8":
                x = np.clip(np.rint(128 + 32 * norm("x", x)), 0, 255)
            for w in writers.values():
                w.add({"x": x, "y": b["y"].numpy()[:left]})
            left -= len(x)
            if left <= 0:
                break
        if left <= 0:
            break
    for w in writers.values():
        w.close({"source": f"bench loader: {m.path}"})
    return {d: root / d for d in writers}


def _compact(m, args) -> dict | None:
    """Reader samples/s on uint8 vs float32 shards of the same images (normalized, as a trainer reads)."""
    if args.compact_samples <= 0 or not _imagelike(m):
        return None
    root = Path(tempfile.mkdtemp(prefix="hpc-compact-", dir=args.rss_dir))
    try:
        sets = _compact_sets(m, root, args.compact_samples)
        runs = _medians({d: (lambda split=split: _reader(split, args.batch_size, normalize=True))
                         for d, split in sets.items()}, args.repeat)
        per = {d: int(np.prod(m.fields["x"].shape, dtype=np.int64)) * np.dtype(d).itemsize for d in sets}
        out = {d: {"samples": runs[d]["samples"], "seconds": runs[d]["seconds"],
                   "samples_per_s": runs[d]["samples"] / runs[d]["seconds"],
                   "x_bytes_per_sample": per[d], "mb_per_s": runs[d]["samples"] * per[d] / runs[d]["seconds"] / 1e6,
                   "bytes": sum(f.stat().st_size for f in sets[d].iterdir())} for d in sets}
        out["uint8_vs_float32"] = out["uint8"]["samples_per_s"] / out["float32"]["samples_per_s"]
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _imagelike(m) -> bool:
    return m.task != "ratings" and "x" in m.fields and bool(m.fields["x"].shape)


def _checksum_copies(m, root: Path, samples: int) -> dict:
    """Whole shards of ``m`` (up to ``samples`` rows) copied twice, same chunks: plain and with
    HDF5's fletcher32 filter (a checksum per chunk, checked by HDF5 on every read)."""
    import h5py

    from hpc.data.manifest import write_manifest
    from hpc.util.io import sha256_file

    out = {}
    for kind in ("plain", "fletcher32"):
        d = root / kind
        d.mkdir(parents=True)
        shards, n = [], 0
        for i, info in enumerate(m.shards):
            if n >= samples:
                break
            dst = d / Path(info.file).name
            with h5py.File(m.shard_path(i), "r") as f, h5py.File(dst, "w") as g:
                for name, dpath in info.datasets.items():
                    src = f[dpath]
                    g.create_dataset(dpath, data=src[:info.samples], chunks=src.chunks or True,
                                     fletcher32=kind == "fletcher32")
            shards.append(dataclasses.replace(info, file=dst.name, bytes=dst.stat().st_size, sha256=sha256_file(dst)))
            n += info.samples
        copy = dataclasses.replace(m, shards=shards, path=None, sha256=None, class_counts=None)  # a subset
        write_manifest(d, copy)
        out[kind] = d
    return out


def _integrity(m, args) -> dict | None:
    """Reader samples/s with no content check, with the sha256 pass a run's first epoch makes (the
    default; later epochs only stat the shards), and
    on a fletcher32 copy (HDF5 checks each chunk; no os.preadv then); same rows, interleaved."""
    if args.integrity_samples <= 0:
        return None
    root = Path(tempfile.mkdtemp(prefix="hpc-integrity-", dir=args.rss_dir))
    try:
        sets = _checksum_copies(m, root, args.integrity_samples)
        cases = {"preadv, no check": (sets["plain"], True, False),
                 "preadv + sha256 (a run's first epoch)": (sets["plain"], True, True),
                 "hdf5 io, no check": (sets["plain"], False, False),
                 "hdf5 io + fletcher32": (sets["fletcher32"], False, False)}
        best = {k: float("inf") for k in cases}
        for k, (d, direct, verify) in cases.items():  # warm-up
            n, _ = _reader(d, args.batch_size, direct_io=direct, normalize=True, verify=verify)
        for _ in range(args.repeat):
            for k, (d, direct, verify) in cases.items():
                n, t = _reader(d, args.batch_size, direct_io=direct, normalize=True, verify=verify)
                best[k] = min(best[k], t)
        base = n / best["preadv, no check"]
        return {k: {"samples": n, "seconds": best[k], "samples_per_s": n / best[k],
                    "vs_no_check": n / best[k] / base} for k in cases}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _read_rows(split: Path, args, with_naive: bool) -> dict:
    """The main table's loaders on one shard set: medians of interleaved passes (plus the naive
    loader once, when asked: it is slow and per-sample)."""
    from hpc.data import load_manifest
    from hpc.data.parallelfill import default_io_threads

    m = load_manifest(split)
    bufs, ring = _raw_buffers(m), _ring(m, args.batch_size)
    cases = {
        "raw": lambda: _raw(m, bufs)[::2],
        "practical limit": lambda: _practical(split, args.batch_size, ring),
        "reader": lambda: _reader(split, args.batch_size),
        "reader, 1 io thread": lambda: _reader(split, args.batch_size, io_threads=1),
    }
    if with_naive:
        cases["reader_hdf5_io"] = lambda: _reader(split, args.batch_size, direct_io=False)
    res = _medians(cases, args.repeat)
    del bufs, ring
    if with_naive:
        n, t = _naive(m, args.batch_size, args.naive_samples, args.naive_workers)
        res["naive"] = {"samples": n, "seconds": t, "all_seconds": [t], "workers": args.naive_workers}
    per = sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in m.fields.values())
    for v in res.values():
        v["samples_per_s"] = v["samples"] / v["seconds"]
        v["mb_per_s"] = v["samples"] * per / v["seconds"] / 1e6
    for v in res.values():
        v["vs_raw"] = v["samples_per_s"] / res["raw"]["samples_per_s"]
        v["vs_practical"] = v["samples_per_s"] / res["practical limit"]["samples_per_s"]
    return {"data": str(split), "x_dtype": m.fields["x"].dtype if "x" in m.fields else None,
            "samples": m.total_samples, "bytes_per_sample": per, "shards": len(m.shards),
            "data_mb": m.total_samples * per / 1e6, "io_threads": default_io_threads(), "rows": res}


def _table_rows(part: dict) -> list:
    return [[k, part["x_dtype"], part["bytes_per_sample"], v["samples"], v["seconds"], v["samples_per_s"],
             v["mb_per_s"], v["vs_raw"], v["vs_practical"]] for k, v in part["rows"].items()]


HEADERS = ["loader", "stored x", "bytes/sample", "samples", "seconds", "samples/s", "MB/s", "vs raw",
           "vs practical limit"]


def _uint8_rows(m, split: Path, args) -> dict | None:
    """The main table's loaders on the same images stored as uint8 (a copy in ``--rss-dir``)."""
    if args.uint8_samples == 0 or not _imagelike(m) or m.fields["x"].dtype == "uint8":
        return None
    root = Path(tempfile.mkdtemp(prefix="hpc-uint8-", dir=args.rss_dir))
    try:
        samples = m.total_samples if args.uint8_samples < 0 else min(args.uint8_samples, m.total_samples)
        sets = _compact_sets(m, root, samples, dtypes=("uint8",))
        return _read_rows(sets["uint8"], args, with_naive=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args) -> int:
    from hpc.data import load_manifest

    split = _split(args.data)
    m = load_manifest(split)
    main = _read_rows(split, args, with_naive=True)
    rows = main["rows"]
    load = os.getloadavg()
    result = {
        "data": str(split), "samples": m.total_samples, "bytes_per_sample": main["bytes_per_sample"],
        "shards": len(m.shards), "data_mb": main["data_mb"], "batch_size": args.batch_size,
        "io_threads": main["io_threads"], "statistic": "median", **rows,
        "reader_vs_raw": rows["reader"]["vs_raw"], "reader_vs_practical": rows["reader"]["vs_practical"],
        "reader_vs_naive": rows["reader"]["samples_per_s"] / rows["naive"]["samples_per_s"],
        "cpus": os.cpu_count(), "repeat": args.repeat, "load_average": load,
    }
    emit(f"loader: {split} ({m.total_samples} samples, {main['data_mb']:.0f} MB, {len(m.shards)} shards, "
         f"batch {args.batch_size}, io_threads {main['io_threads']}, median of {max(1, args.repeat)} interleaved "
         f"passes, load {load[0]:.1f}); reader/raw = {result['reader_vs_raw']:.2f}, "
         f"reader/practical limit = {result['reader_vs_practical']:.2f}, "
         f"reader/naive = {result['reader_vs_naive']:.1f}",
         HEADERS, _table_rows(main), result, None)
    u8 = _uint8_rows(m, split, args)
    if u8 is not None:
        result["uint8"] = u8
        r8 = u8["rows"]
        emit(f"the same {r8['reader']['samples']} images stored as uint8 ({u8['bytes_per_sample']} bytes/sample "
             f"read vs {main['bytes_per_sample']}); the reader yields float32; vs raw / practical limit: of the "
             f"uint8 set; reader uint8/float32 samples/s = "
             f"{r8['reader']['samples_per_s'] / rows['reader']['samples_per_s']:.2f}",
             HEADERS, _table_rows(u8), result, None)
    compact = _compact(m, args)
    if compact is not None:
        result["compact"] = compact
        emit(f"compact dtypes: the same {compact['uint8']['samples']} images stored as uint8 and as float32, "
             f"read with normalization; uint8/float32 = {compact['uint8_vs_float32']:.2f}",
             ["stored x", "x bytes/sample", "samples", "seconds", "samples/s", "x MB/s read", "vs float32"],
             [[d, compact[d]["x_bytes_per_sample"], compact[d]["samples"], compact[d]["seconds"],
               compact[d]["samples_per_s"], compact[d]["mb_per_s"],
               compact[d]["samples_per_s"] / compact["float32"]["samples_per_s"]] for d in ("float32", "uint8")],
             result, None)
    integrity = _integrity(m, args)
    if integrity is not None:
        result["integrity"] = integrity
        emit(f"content checks: the reader on a copy of {next(iter(integrity.values()))['samples']} rows, "
             f"normalized, load average {os.getloadavg()[0]:.1f}",
             ["reader", "samples", "seconds", "samples/s", "vs no check"],
             [[k, v["samples"], v["seconds"], v["samples_per_s"], v["vs_no_check"]] for k, v in integrity.items()],
             result, None)
    sizes = [float(s) for s in args.rss_gb.split(",") if s.strip()]
    if sizes:
        rss = [_rss(gb, args.rss_dir, args.batch_size) for gb in sizes]
        result["rss"] = rss
        first = rss[0]["peak_rss_mb"]
        result["rss_growth"] = max(r["peak_rss_mb"] for r in rss) / first - 1
        emit(f"peak RSS while streaming synthetic images (growth {100 * result['rss_growth']:.1f} % "
             f"from {sizes[0]:g} GB to {sizes[-1]:g} GB)",
             ["GB", "data MB", "samples", "generate s", "stream s", "RSS before MB", "peak RSS MB"],
             [[r["gb"], r["bytes"] / 1e6, r["samples"], r["generate_seconds"], r["seconds"], r["rss_before_mb"],
               r["peak_rss_mb"]] for r in rss], result, None)
    if args.json:

        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--rss-child":
        _rss_child(sys.argv[2], int(sys.argv[3]))
