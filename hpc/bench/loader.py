"""`hpc bench loader`: the streaming reader vs raw h5py reads vs a naive per-sample Dataset.

Measured in one run on the same shards (after one untimed warm-up pass, so all three read from the
same page-cache state): (a) raw sequential ``read_direct`` of whole shard datasets, the limit;
(b) ``StreamingReader`` (rank 0 of 1, shuffled, prefetch threads, no normalization/augmentation),
and the same with ``direct_io=False`` (every read through HDF5) for reference;
(c) a map-style torch Dataset reading one sample per ``__getitem__`` through h5py, under a
DataLoader (handles opened per worker). (d) Compact dtypes: the first ``--compact-samples`` images of
the data as uint8 shards and as float32 shards of the same values (quantized from the data when it
is not uint8 already), each read by the reader with normalization (uint8: 4x fewer bytes read,
converted to float32 per batch). Then, in child processes, peak RSS while streaming a synthetic
image data set of each ``--rss-gb`` size (generated chunk by chunk, then deleted).
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
    p.add_argument("--repeat", type=int, default=3, help="interleaved passes of raw and reader; best of each")
    p.add_argument("--naive-samples", type=int, default=20000,
                   help="samples the naive loader reads (it is slow; its rate is per sample)")
    p.add_argument("--naive-workers", type=int, default=0, help="DataLoader workers of the naive loader")
    p.add_argument("--rss-gb", default="1,10", help="sizes (GB) of the synthetic sets streamed for peak RSS; "
                   "'' to skip")
    p.add_argument("--rss-dir", default=None, help="where to generate them (default: a temp dir in /tmp)")
    p.add_argument("--compact-samples", type=int, default=20000,
                   help="images copied to uint8 and float32 shard sets (in --rss-dir) for the compact-dtype "
                        "rows; 0 to skip")
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
            verify: bool = False) -> tuple[int, float]:
    """One pass of a new StreamingReader. ``verify=False`` by default: the read path is what the
    other rows compare; the content check's cost (the first epoch of a run hashes every shard it
    reads) has rows of its own (``_integrity``)."""
    from hpc.data import StreamingReader

    r = StreamingReader(split, 0, 1, batch_size, seed=0, normalize=normalize, remainder="pad", direct_io=direct_io,
                        verify=verify)
    t0, n = time.perf_counter(), 0
    for b in r:
        n += int(b["weight"].count_nonzero())
    return n, time.perf_counter() - t0


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


def _compact_sets(m, root: Path, samples: int) -> dict[str, Path]:
    """The first ``samples`` rows of ``m`` as two shard sets holding the same values: x as uint8
    (quantized, 128 + 32 sigma, from the data's statistics unless already uint8) and as float32."""
    from hpc.data import FieldSpec, ShardWriter
    from hpc.data.normalize import input_stats, normalizer
    from hpc.data.reader import iter_shard

    norm = normalizer(input_stats(m.schema(), m.stats), {k: s.shape for k, s in m.fields.items()})
    ytype = m.schema()["fields"]["y"]["dtype"]
    writers = {d: ShardWriter(root / d, m.task, {"x": FieldSpec(d, m.fields["x"].shape), "y": FieldSpec(ytype, ())},
                              source="bench") for d in ("uint8", "float32")}
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
    if args.compact_samples <= 0 or m.task == "ratings" or not m.fields["x"].shape:
        return None
    root = Path(tempfile.mkdtemp(prefix="hpc-compact-", dir=args.rss_dir))
    try:
        sets = _compact_sets(m, root, args.compact_samples)
        best = {d: float("inf") for d in sets}
        for d, split in sets.items():
            n, _ = _reader(split, args.batch_size, normalize=True)  # warm-up: page cache, pools
        for _ in range(args.repeat):  # interleaved, best of each
            for d, split in sets.items():
                n, t = _reader(split, args.batch_size, normalize=True)
                best[d] = min(best[d], t)
        per = {d: int(np.prod(m.fields["x"].shape, dtype=np.int64)) * np.dtype(d).itemsize for d in sets}
        out = {d: {"samples": n, "seconds": best[d], "samples_per_s": n / best[d],
                   "x_bytes_per_sample": per[d], "mb_per_s": n * per[d] / best[d] / 1e6,
                   "bytes": sum(f.stat().st_size for f in sets[d].iterdir())} for d in sets}
        out["uint8_vs_float32"] = out["uint8"]["samples_per_s"] / out["float32"]["samples_per_s"]
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


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


def run(args) -> int:
    from hpc.data import load_manifest

    split = _split(args.data)
    m = load_manifest(split)
    per_sample = sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in m.fields.values())
    bufs = _raw_buffers(m)
    _raw(m, bufs)  # warm-up: same page-cache state for all three
    # Interleaved repeats, best of each: on a shared machine a neighbour's burst hits one pass,
    # not one side of the ratio.
    t_raw = t_rd = t_h5 = float("inf")
    for _ in range(args.repeat):
        n_raw, bytes_raw, t = _raw(m, bufs)
        t_raw = min(t_raw, t)
        n_rd, t = _reader(split, args.batch_size)
        t_rd = min(t_rd, t)
        n_h5, t = _reader(split, args.batch_size, direct_io=False)
        t_h5 = min(t_h5, t)
    del bufs
    n_nv, t_nv = _naive(m, args.batch_size, args.naive_samples, args.naive_workers)
    rate = {"raw": n_raw / t_raw, "reader": n_rd / t_rd, "reader_hdf5_io": n_h5 / t_h5, "naive": n_nv / t_nv}
    result = {
        "data": str(split), "samples": m.total_samples, "bytes_per_sample": per_sample, "shards": len(m.shards),
        "data_mb": m.total_samples * per_sample / 1e6, "batch_size": args.batch_size,
        "raw": {"samples": n_raw, "seconds": t_raw, "samples_per_s": rate["raw"], "mb_per_s": bytes_raw / t_raw / 1e6},
        "reader": {"samples": n_rd, "seconds": t_rd, "samples_per_s": rate["reader"],
                   "mb_per_s": n_rd * per_sample / t_rd / 1e6},
        "reader_hdf5_io": {"samples": n_h5, "seconds": t_h5, "samples_per_s": rate["reader_hdf5_io"],
                           "mb_per_s": n_h5 * per_sample / t_h5 / 1e6},
        "naive": {"samples": n_nv, "seconds": t_nv, "samples_per_s": rate["naive"],
                  "mb_per_s": n_nv * per_sample / t_nv / 1e6, "workers": args.naive_workers},
        "reader_vs_raw": rate["reader"] / rate["raw"], "reader_vs_naive": rate["reader"] / rate["naive"],
        "cpus": os.cpu_count(), "repeat": args.repeat, "load_average": os.getloadavg(),
    }
    rows = [[k, result[k]["samples"], result[k]["seconds"], result[k]["samples_per_s"], result[k]["mb_per_s"],
             rate[k] / rate["raw"]] for k in ("raw", "reader", "reader_hdf5_io", "naive")]
    emit(f"loader: {split} ({m.total_samples} samples, {result['data_mb']:.0f} MB, {len(m.shards)} shards, "
         f"batch {args.batch_size}); reader/raw = {result['reader_vs_raw']:.2f}, "
         f"reader/naive = {result['reader_vs_naive']:.1f}",
         ["loader", "samples", "seconds", "samples/s", "MB/s", "vs raw"], rows, result, None)
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
