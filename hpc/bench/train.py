"""`hpc bench train`: the trainer's throughput vs a plain PyTorch loop, 2-rank scaling, time fractions.

The command starts ``mpiexec -n 1`` and ``mpiexec -n 2`` of ``hpc bench train --worker`` itself
(one thread per rank). The workload is a CNN on 3x16x16 images, ``--batch`` samples per rank:

- ``plain``: a hand-written loop (index in-memory tensors, forward, cross-entropy, backward, SGD
  step) on 1 rank: the ceiling for one process;
- ``trainer``: ``hpc.train`` on the same model, batch and in-memory data (``MemoryReader``):
  ``trainer_vs_plain = trainer / plain`` (goal >= 0.95);
- ``trainer`` on 2 ranks with the same per-rank batch (weak scaling):
  ``scaling_2 = sps(2 ranks) / (2 x sps(1 rank))``; on a 2-core machine 1.0 is the ceiling;
- ``trainer_h5``: the trainer reading HDF5 shards through ``StreamingReader``: the fractions of
  step time spent waiting for data (goal <= 5 %) and in gradient communication.

Variants alternate within a worker and the best of ``--repeats`` is kept, so a load change on a
shared machine hits them alike. samples/s counts training steps only (no validation, checkpoints).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

from hpc.dist.spawn import MPIEXEC_HINT, find_mpiexec, launch_env, mpiexec_command
from hpc.dist.world import world_from_env
from hpc.util.io import atomic_write_json, read_json
from hpc.util.table import emit

# Heavy imports (torch ~1.6-2.3 s, mpi4py's MPI init ~1.1 s, and hpc.data/models/train/infer, which
# import torch) stay inside the functions: `hpc --help` imports every bench module to list it.

SHAPE = (3, 16, 16)
CLASSES = 10
MODEL = {"family": "cnn", "config": {"channels": [16, 32], "batch_norm": True, "head_width": 64}}


def register(sub) -> None:
    p = sub.add_parser("train", help="trainer vs a plain PyTorch loop, 2-rank scaling, data-wait fraction")
    p.add_argument("--batch", type=int, default=64, help="samples per rank per step (default 64)")
    p.add_argument("--steps", type=int, default=200, help="steps per timed run (default 200)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the best is kept")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", help="(internal) run as one rank and write results here")
    p.add_argument("--data", help="(internal) shard directory for the HDF5 variant")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.worker:
        return _worker(args)
    if args.batch < 1 or args.steps < 10 or args.repeats < 1:
        raise ValueError("--batch >= 1, --steps >= 10 and --repeats >= 1 are required")
    from hpc.data import SynthConfig, synth

    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise ValueError("hpc bench train starts mpiexec itself, which was not found: " + MPIEXEC_HINT)
    cores = os.cpu_count() or 1
    res = {}
    with tempfile.TemporaryDirectory(prefix="hpc-bench-train-") as tmp:
        # Enough samples for every timed run on 2 ranks to stay inside one epoch of the shards.
        n = 2 * args.batch * (args.steps + 10)
        synth(SynthConfig(kind="images", samples=n, channels=SHAPE[0], size=SHAPE[1], classes=CLASSES),
              Path(tmp) / "data", split="train=1")
        for ranks in (1, 2):
            out = Path(tmp) / f"r{ranks}.json"
            argv = ["bench", "train", "--worker", str(out), "--data", str(Path(tmp) / "data"),
                    "--batch", str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats)]
            env = launch_env(ranks, cores)
            env["OMP_NUM_THREADS"] = "1"  # the same threads per rank for 1 and 2 ranks
            cmd = mpiexec_command(ranks, argv, mpiexec, cores)
            # No core binding: Open MPI binds rank r to core r when ranks <= cores, so on a shared
            # machine another job's rank 0 lands on our rank 0's core while a core idles, and the
            # 1- vs 2-rank comparison measures the neighbours instead of us.
            cmd[1:1] = ["--bind-to", "none"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                return 1
            res[ranks] = read_json(out)
    one, two = res[1], res[2]
    ratios = {"trainer_vs_plain": one["trainer"] / one["plain"],
              "scaling_2": two["trainer"] / (2 * one["trainer"]),
              "data_wait_1": one["h5_fractions"]["data_wait"], "data_wait_2": two["h5_fractions"]["data_wait"],
              "comm_wait_2": two["h5_fractions"]["comm_wait"]}
    rows = [
        ["plain PyTorch loop", 1, one["plain"], "", "", ""],
        ["trainer, in-memory data", 1, one["trainer"], ratios["trainer_vs_plain"], "", ""],
        ["trainer, in-memory data", 2, two["trainer"], "", ratios["scaling_2"], ""],
        ["trainer, HDF5 StreamingReader", 1, one["h5"], "", "", f"data {one['h5_fractions']['data_wait']:.1%}"],
        ["trainer, HDF5 StreamingReader", 2, two["h5"], "", "",
         f"data {two['h5_fractions']['data_wait']:.1%}, comm {two['h5_fractions']['comm_wait']:.1%}"],
    ]
    title = (f"train: CNN {MODEL['config']['channels']} on 3x16x16 images, batch {args.batch}/rank, "
             f"{args.steps} steps, best of {args.repeats} (samples/s; 1 thread per rank; {cores} cores)")
    emit(title, ["variant", "ranks", "samples_per_s", "trainer_vs_plain", "scaling_2", "step time waiting"],
         rows, {"config": {k: v for k, v in vars(args).items() if k not in ("func", "worker", "data")},
                "ranks": {str(k): v for k, v in res.items()}, "ratios": ratios}, args.json)
    return 0


# -- one rank -------------------------------------------------------------------------------------

def _memory(rank: int, world: int, batch: int, steps: int):
    import torch

    g = torch.Generator().manual_seed(0)
    n = batch * world * steps
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _config(out: str, tag: str, batch: int, world: int, steps: int, data_dir: str) -> dict:
    return {"name": "bench", "run_id": tag, "out_dir": out, "seed": 0, "model": MODEL,
            "data": {"dir": data_dir, "batch_size": batch * world, "shuffle": False},
            "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "train": {"max_steps": steps, "log_every": 10_000, "progress": False},
            "checkpoint": {"at_end": False}, "dist": {"backend": "auto"}}


def _plain(x, y, batch: int, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from hpc.models import build_model

    torch.manual_seed(0)
    schema = {"fields": {"x": {"dtype": "float32", "shape": list(SHAPE)}}, "num_classes": CLASSES}
    model = build_model(MODEL["family"], MODEL["config"], schema)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    t0 = time.perf_counter()
    for i in range(steps):
        xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
        opt.zero_grad()
        F.cross_entropy(model({"x": xb}), yb).backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def _worker(args) -> int:
    from hpc.train import run as train
    from hpc.train.inputs import Data
    from hpc.train.memdata import MemoryReader

    logging.getLogger("hpc.train").setLevel(logging.WARNING)
    w = world_from_env()
    out = str(Path(args.worker).parent / "runs")
    x, y = _memory(w.rank, w.size, args.batch, args.steps)
    schema = {"fields": {"x": {"dtype": "float32", "shape": list(SHAPE)}}, "num_classes": CLASSES}
    best = {"plain": 0.0, "trainer": 0.0, "h5": 0.0}
    fractions = {}
    for rep in range(args.repeats):
        if w.size == 1:
            best["plain"] = max(best["plain"], _plain(x, y, args.batch, args.steps))
        reader = MemoryReader({"x": x, "y": y}, w.rank, w.size, args.batch, shuffle=False)
        s = train(_config(out, f"mem{rep}", args.batch, w.size, args.steps, "memory"),
                  data=Data(schema, reader))
        best["trainer"] = max(best["trainer"], s["samples_per_s"])
        s = train(_config(out, f"h5{rep}", args.batch, w.size, args.steps, args.data))
        if s["samples_per_s"] > best["h5"]:
            best["h5"], fractions = s["samples_per_s"], s["time_fractions"]
    if w.rank == 0:
        atomic_write_json(args.worker, {**best, "h5_fractions": fractions, "ranks": w.size})
    return 0
