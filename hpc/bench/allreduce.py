"""`hpc bench allreduce`: our gradient sync vs one raw MPI Allreduce, per-tensor allreduce, Horovod.

For each rank count the command starts ``mpiexec -n R python -m hpc bench allreduce --worker ...``
itself. Every rank holds a gradient set shaped like a real model's (``--tensors`` tensors of lognormal
sizes, ``--mb`` MB of float32 in all, rank-dependent values) and times, median of ``--repeats`` runs
after one warm-up (each run's time is the slowest rank's):

- ``raw``: one ``MPI.Allreduce`` of a contiguous buffer of the same bytes (the floor for a sync that
  must also pack and unpack): ``sync_vs_raw = raw / sync`` (goal >= 0.9);
- ``per_tensor``: one allreduce per gradient, then the division: ``sync_vs_per_tensor``;
- ``horovod``: ``hvd.grouped_allreduce_`` (Average) of the same tensors under a fixed name (so its
  response cache hits, as with DistributedOptimizer's parameter names), when Horovod is importable:
  with Horovod's default fusion threshold (128 MB in 0.28.1, or ``HOROVOD_FUSION_THRESHOLD`` if set)
  in the main table, and with each ``--horovod-fusion-mb`` in a table of its own. Horovod runs only
  inside its own timing window: each round calls
  ``hvd.init()``, one untimed warm-up, the timed call, ``hvd.shutdown()``. Its background thread wakes
  every millisecond and runs an MPI collective even when idle, which slowed every other variant
  measured in the same process 2-5x on 2 cores;
- ``sync``: ``GradSync.synchronize()`` (pack, reduce, average, unpack) for each ``--bucket-mb``.
  This is the sync with nothing to overlap with (no backward): its worst case.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from hpc.dist.spawn import MPIEXEC_HINT, find_mpiexec, launch_env, mpiexec_command
from hpc.util.io import atomic_write_json, read_json
from hpc.util.table import emit

# Heavy imports (torch ~1.6-2.3 s, mpi4py's MPI init ~1.1 s, and hpc.data/models/train/infer, which
# import torch) stay inside the functions: `hpc --help` imports every bench module to list it.

_MB = 1 << 20
HOROVOD_DEFAULT_FUSION_MB = 128.0  # Horovod 0.28.1's fusion threshold unless HOROVOD_FUSION_THRESHOLD is set


def model_like_sizes(total_bytes: int, n: int, seed: int = 0) -> list[int]:
    """Element counts (float32) of ``n`` tensors summing to ``total_bytes``: half weight matrices of
    lognormal size, half biases about the square root of their weight's size (pure)."""
    if n < 1 or total_bytes < 4 * n:
        raise ValueError(f"--tensors {n} / --mb {total_bytes / _MB:g}: need at least one float per tensor")
    rng = random.Random(seed)
    weights = [rng.lognormvariate(0, 1.0) for _ in range((n + 1) // 2)]
    raw = []
    for w in weights:
        raw += [w, math.sqrt(w) * 1e-3]
    raw = raw[:n]
    total = total_bytes // 4
    sizes = [max(1, int(total * r / sum(raw))) for r in raw]
    sizes[0] += total - sum(sizes)  # exact total
    return sizes


def _parse_list(text: str, kind, what: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{what} {text!r}: expected a comma-separated list of positive numbers, e.g. 2,4")
    return values


def register(sub) -> None:
    p = sub.add_parser("allreduce", help="gradient sync vs raw MPI Allreduce / per-tensor / Horovod")
    p.add_argument("--ranks", default="2", help="comma-separated rank counts (default: 2)")
    p.add_argument("--mb", type=float, default=100.0, help="total gradient MB (default: 100)")
    p.add_argument("--tensors", type=int, default=200, help="number of gradient tensors (default: 200)")
    p.add_argument("--bucket-mb", default="4,25,64,128", help="bucket sizes to measure (default: 4,25,64,128)")
    p.add_argument("--horovod-fusion-mb", default="64,25",
                   help="more Horovod fusion thresholds (HOROVOD_FUSION_THRESHOLD) to measure besides "
                        "Horovod's default (128 MB), when Horovod is installed (default: 64,25)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per variant; the median is reported")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", help="(internal) run as one rank and write results here")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.worker:
        return _worker(args)
    from hpc.dist.grad_sync import DEFAULT_BUCKET_MB

    ranks = _parse_list(args.ranks, int, "--ranks")
    buckets = _parse_list(args.bucket_mb, float, "--bucket-mb")
    if DEFAULT_BUCKET_MB not in buckets:
        buckets.append(DEFAULT_BUCKET_MB)
    fusions = _parse_list(args.horovod_fusion_mb, float, "--horovod-fusion-mb")
    model_like_sizes(int(args.mb * _MB), args.tensors)  # validate before starting ranks
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: must be at least 1")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise ValueError("hpc bench allreduce starts mpiexec itself, which was not found: " + MPIEXEC_HINT)
    cores = os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory(prefix="hpc-bench-allreduce-") as tmp:
        for r in ranks:
            out = Path(tmp) / f"ranks{r}.json"
            argv = ["bench", "allreduce", "--worker", str(out), "--mb", str(args.mb), "--tensors",
                    str(args.tensors), "--bucket-mb", ",".join(map(str, buckets)), "--repeats", str(args.repeats),
                    "--horovod-fusion-mb", ",".join(map(str, fusions))]
            proc = subprocess.run(mpiexec_command(r, argv, mpiexec, cores), env=launch_env(r, cores),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                return 1
            results.append(read_json(out))
    rows, sweep, hsweep = [], [], []
    for res in results:
        t = res["ms"]
        sync = t[f"sync_{DEFAULT_BUCKET_MB:g}"]
        hvd = t.get("horovod")
        res["ratios"] = {"sync_vs_raw": t["raw"] / sync, "sync_vs_per_tensor": t["per_tensor"] / sync,
                         "sync_vs_horovod": hvd / sync if hvd else None}
        rows.append([res["ranks"], args.mb, args.tensors, t["raw"], sync, t["per_tensor"],
                     "n/a (not installed)" if hvd is None else hvd, res["ratios"]["sync_vs_raw"],
                     res["ratios"]["sync_vs_per_tensor"],
                     "n/a" if hvd is None else res["ratios"]["sync_vs_horovod"]])
        for b in buckets:
            sweep.append([res["ranks"], f"{b:g}" + (" (default)" if b == DEFAULT_BUCKET_MB else ""),
                          res["buckets"][f"{b:g}"], t[f"sync_{b:g}"], t["raw"] / t[f"sync_{b:g}"]])
        if hvd is not None:
            hsweep.append([res["ranks"], f"{res['horovod_fusion_mb']:g} (default)", hvd, sync, hvd / sync])
        for f in fusions if hvd is not None else ():
            h = t[f"horovod_fusion_{f:g}"]
            hsweep.append([res["ranks"], f"{f:g}", h, sync, h / sync])
    title = (f"allreduce: GradSync (bucket {DEFAULT_BUCKET_MB:g} MB) vs baselines, {args.mb:g} MB in "
             f"{args.tensors} float32 tensors, median of {args.repeats} (ms; ratio > 1: GradSync faster)")
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("func", "worker")},
              "default_bucket_mb": DEFAULT_BUCKET_MB, "results": results}
    emit(title, ["ranks", "MB", "tensors", "raw_ms", "sync_ms", "per_tensor_ms", "horovod_ms",
                 "sync_vs_raw", "sync_vs_per_tensor", "sync_vs_horovod"], rows, result, None)
    print()
    emit("bucket size sweep (GradSync.synchronize)", ["ranks", "bucket_mb", "buckets", "sync_ms", "sync_vs_raw"],
         sweep, result, None if hsweep else args.json)
    if hsweep:
        print()
        emit(f"Horovod fusion threshold sweep (HOROVOD_FUSION_THRESHOLD) vs GradSync (bucket {DEFAULT_BUCKET_MB:g} MB)",
             ["ranks", "fusion_mb", "horovod_ms", "sync_ms", "sync_vs_horovod"], hsweep, result, args.json)
    return 0


def _worker(args) -> int:
    import torch

    from hpc.dist import GradSync, init_comm
    from hpc.dist.mpi_backend import load_mpi

    comm = init_comm("mpi")
    MPI = load_mpi()
    r = comm.rank
    sizes = model_like_sizes(int(args.mb * _MB), args.tensors)

    def grad_set() -> list[torch.nn.Parameter]:
        # Parameters stay untouched (torch.empty: no pages); gradients hold rank-dependent values.
        params = [torch.nn.Parameter(torch.empty(n)) for n in sizes]
        for p in params:
            p.grad = torch.full_like(p, float(r + 1))
        return params

    # Each variant gets its own gradient set: GradSync keeps the gradients in its buckets, and
    # sharing one set would add a copy into the other variant's buckets at every call.
    raw = torch.full((sum(sizes),), float(r + 1))
    variants = {"raw": lambda: MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, raw.numpy(), op=MPI.SUM)}
    per_tensor_grads = [p.grad for p in grad_set()]

    def per_tensor():
        for g in per_tensor_grads:
            comm.allreduce_(g).div_(comm.size)

    variants["per_tensor"] = per_tensor
    n_buckets = {}
    for b in _parse_list(args.bucket_mb, float, "--bucket-mb"):
        gs = GradSync(comm, grad_set(), bucket_mb=b)
        n_buckets[f"{b:g}"] = len(gs.buckets)
        variants[f"sync_{b:g}"] = gs.synchronize
    try:
        import horovod.torch as hvd
    except ImportError:
        hvd = None
    # Horovod variant -> HOROVOD_FUSION_THRESHOLD (bytes; None: as in the environment), set before
    # each hvd.init(), which reads it.
    horovod_fusion: dict[str, str | None] = {}
    user_fusion = os.environ.get("HOROVOD_FUSION_THRESHOLD")
    if hvd is not None:
        hvd_grads = [p.grad for p in grad_set()]
        horovod_fusion["horovod"] = user_fusion
        for f in _parse_list(args.horovod_fusion_mb, float, "--horovod-fusion-mb"):
            horovod_fusion[f"horovod_fusion_{f:g}"] = str(int(f * _MB))
        for name in horovod_fusion:
            # A fixed name: Horovod's response cache then skips the negotiation from the 2nd call on.
            variants[name] = lambda: hvd.grouped_allreduce_(hvd_grads, op=hvd.Average, name="bench.grads")

    def prepare(name: str) -> None:
        if name in horovod_fusion:  # Horovod runs only inside its own window (module docstring)
            if horovod_fusion[name] is None:
                os.environ.pop("HOROVOD_FUSION_THRESHOLD", None)
            else:
                os.environ["HOROVOD_FUSION_THRESHOLD"] = horovod_fusion[name]
            hvd.init()
            variants[name]()  # warm-up: fusion buffer, response cache

    def finish(name: str) -> None:
        if name in horovod_fusion:
            hvd.shutdown()

    # Interleaved: every round runs each variant once, in a rotating order, so a load change on
    # this shared machine hits all variants alike. A run's time is the slowest rank's.
    names = list(variants)
    for name in names:
        if name not in horovod_fusion:
            variants[name]()  # warm-up: page faults, connection setup
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            prepare(name)
            comm.barrier()
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
            finish(name)
    gathered = comm.allgather_object(times)
    ms = {name: statistics.median(max(ts) for ts in zip(*(g[name] for g in gathered))) * 1e3
          for name in names}
    if r == 0:
        atomic_write_json(args.worker, {"ranks": comm.size, "ms": ms, "buckets": n_buckets,
                                        "horovod_fusion_mb": int(user_fusion) / _MB if user_fusion
                                        else HOROVOD_DEFAULT_FUSION_MB,
                                        "mpi": MPI.Get_library_version().splitlines()[0]})
    comm.barrier()
    comm.close()
    return 0
