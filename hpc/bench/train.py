"""`hpc bench train`: the trainer vs a plain PyTorch loop, 2-rank scaling, where a step's time goes,
and the start-up of `hpc train --nproc 2` to its first optimizer step.

The command starts ``hpc bench train --worker`` under mpiexec four ways, with T = cores / 2
threads per rank (what ``hpc train --nproc 2`` gives each rank, ``hpc.dist.spawn``):

- ``1 rank x T threads, pinned to T cores``: the per-core baseline. Each rank of the 2-rank run has
  T cores' worth of the machine, so the rank it is compared with gets the same: T threads and T
  cores, its helper threads (the reader's, the heartbeat's) included. An unpinned 1-rank run would
  also get the idle cores for those threads for free (and once measured 2 threads against 2 x 1);
  the least busy cores are picked (/proc/stat) so a neighbour on core 0 does not slow the baseline.
- ``2 ranks x T threads``, unbound, as ``hpc train --nproc 2`` starts them;
- ``1 rank x all cores``: one process using the whole machine, the alternative to 2 ranks;
- ``2 x (1 rank x T threads), apart``: two independent baseline processes at once, each pinned to
  its own T cores, starting each timed run together: the machine's own ceiling for 2 ranks (shared
  caches, memory bandwidth, the host's scheduling of the vCPUs) with no communication at all.

In each: ``plain`` (a hand-written loop: index in-memory tensors, forward, cross-entropy, backward,
SGD step; baseline only), ``trainer`` (``hpc.train`` on the same model, batch and in-memory data,
``MemoryReader``) and ``h5`` (the trainer reading HDF5 shards through ``StreamingReader``). The
workload is a CNN on 3x16x16 images, ``--batch`` samples per rank (weak scaling):

- ``trainer_vs_plain = trainer / plain`` on the baseline (goal >= 0.95);
- ``scaling_2 = sps(2 ranks) / (2 x sps(baseline))`` for in-memory and HDF5 data (goal >= 0.9);
- ``ceiling_2 = sps(2 apart) / (2 x sps(baseline))``: what the machine allows, and ``vs 2 apart =
  sps(2 ranks) / sps(2 apart)``: what data parallelism itself costs;
- ``vs 1 process = sps(2 ranks) / sps(1 rank x all cores)``;
- data wait and communication wait: fractions of the steady-state step time (the first step, which
  also fills the reader's first window and pays first-call costs, is shown apart); goal <= 2 %.

Every row shows its ranks' torch intra-op / inter-op / OS thread counts and CPU affinity, and a
second table splits each rank's step (data, forward+backward, gradient all-reduce wait, the flags
all-reduce, optimizer). The four launches rotate ``--repeats`` times, one timed run of each variant
per launch, and the best launch of each kind is kept, so a neighbour's burst on a shared machine hits
one launch and a load change hits every kind alike. samples/s count
the steps after the first (which also fills the reader's first window and pays first-call costs;
its time is shown apart). The load average is printed with the tables.

The start-up table runs the real ``hpc train CONFIG --nproc 2 train.max_steps=1`` for each of
``--startup`` (default the digits configs on ``hpc data shard --from sklearn:digits``, a synthetic
stand-in without scikit-learn) and prints the phases its summary.json records ("startup"): cli
(the ``hpc train`` process: imports, config, checks), spawn (mpiexec starting the ranks), imports,
preflight, comm init, run dir, data open, model build, first step.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hpc.dist.spawn import MPIEXEC_HINT, find_mpiexec, launch_env, mpiexec_command, threads_per_rank
from hpc.dist.world import world_from_env
from hpc.util.io import atomic_write_json, read_json
from hpc.util.table import format_table

# Heavy imports (torch ~1.6-2.3 s, mpi4py's MPI init, and hpc.data/models/train, which import torch)
# stay inside the functions: `hpc --help` imports every bench module to list it.

SHAPE = (3, 16, 16)
CLASSES = 10
MODEL = {"family": "cnn", "config": {"channels": [16, 32], "batch_norm": True, "head_width": 64}}
STARTUP_CONFIGS = "digits_softmax,digits_cnn"
SPLIT = ("data", "fwd_bwd", "grad_sync", "flags", "optim")
PHASES = ("cli", "spawn", "imports", "preflight", "comm init", "run dir", "data open", "model build", "first step")


def register(sub) -> None:
    p = sub.add_parser("train", help="trainer vs a plain PyTorch loop, 2-rank scaling, step split, start-up")
    p.add_argument("--batch", type=int, default=64, help="samples per rank per step (default 64)")
    p.add_argument("--steps", type=int, default=200, help="steps per timed run (default 200)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the best is kept")
    p.add_argument("--startup", default=STARTUP_CONFIGS,
                   help=f"configs whose `hpc train --nproc 2` start-up is timed (default {STARTUP_CONFIGS}; '' = none)")
    p.add_argument("--startup-repeats", type=int, default=3, help="start-up runs per config; the best is kept")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", help="(internal) run as one rank and write results here")
    p.add_argument("--data", help="(internal) shard directory for the HDF5 variant")
    p.add_argument("--variants", default="plain,trainer,h5", help="(internal) what the worker runs")
    p.add_argument("--pin", default="", help="(internal) CPUs the worker pins itself to")
    p.add_argument("--rendezvous", default="", help="(internal) DIR:N: start each timed run with N-1 other workers")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.worker:
        return _worker(args)
    if args.batch < 1 or args.steps < 10 or args.repeats < 1 or args.startup_repeats < 0:
        raise ValueError("--batch >= 1, --steps >= 10, --repeats >= 1 and --startup-repeats >= 0 are required")
    from hpc.data import SynthConfig, synth

    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise ValueError("hpc bench train starts mpiexec itself, which was not found: " + MPIEXEC_HINT)
    cores = os.cpu_count() or 1
    t = threads_per_rank(2, cores)
    load = [os.getloadavg()]
    # (label, ranks, threads per rank, pinned, variants, how many independent copies at once)
    launches = [("baseline", 1, t, True, "plain,trainer,h5", 1),
                ("2 ranks", 2, t, False, "trainer,h5", 1),
                ("1 process", 1, cores, False, "trainer,h5", 1),
                ("2 independent", 1, t, True, "trainer,h5", 2)]
    res: dict[str, list[list[dict]]] = {label: [] for label, *_ in launches}
    with tempfile.TemporaryDirectory(prefix="hpc-bench-train-") as tmp:
        # Enough samples for every timed run on 2 ranks to stay inside one epoch of the shards.
        n = 2 * args.batch * (args.steps + 10)
        synth(SynthConfig(kind="images", samples=n, channels=SHAPE[0], size=SHAPE[1], classes=CLASSES),
              Path(tmp) / "data", split="train=1")
        # The launches rotate (baseline, 2 ranks, 1 process, baseline, ...), one timed run of each
        # variant per launch, so a neighbour's burst on a shared machine hits one launch of one
        # kind and the best of the repeats stands.
        for rot in range(args.repeats):
            for label, ranks, threads, pinned, variants, copies in launches:
                # Pinned CPUs are re-picked each time (neighbours move); copies get disjoint sets.
                cpus = quiet_cpus(threads * copies) if pinned else []
                procs = []
                for c in range(copies):
                    out = Path(tmp) / f"{label.replace(' ', '-')}-{rot}-{c}.json"
                    pin = ",".join(map(str, cpus[c * threads:(c + 1) * threads]))
                    argv = ["bench", "train", "--worker", str(out), "--data", str(Path(tmp) / "data"),
                            "--batch", str(args.batch), "--steps", str(args.steps), "--repeats", "1",
                            "--variants", variants, "--pin", pin]
                    if copies > 1:  # the copies start each timed run together
                        argv += ["--rendezvous", f"{tmp}/rv-{rot}:{copies}"]
                    env = launch_env(ranks, cores)
                    env["OMP_NUM_THREADS"] = str(threads)
                    env["HPC_VERIFY_CACHE"] = str(Path(tmp) / "hash-cache")  # not the user's cache
                    procs.append((out, subprocess.Popen(mpiexec_command(ranks, argv, mpiexec, cores), env=env,
                                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                        text=True, cwd=tmp)))
                got = []
                for c, (out, proc) in enumerate(procs):
                    stdout, stderr = proc.communicate()
                    if proc.returncode != 0:
                        print(stdout[-3000:], stderr[-3000:])
                        return 1
                    for r in range(ranks):
                        got.append(read_json(f"{out}.rank{r}"))
                        if copies > 1:
                            got[-1]["who"] = f"p{c}"
                res[label].append(got)
        startup = _startup(args, tmp) if args.startup and args.startup_repeats else []
    load.append(os.getloadavg())
    result = _report(args, res, startup, cores, t, load)
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def quiet_cpus(k: int) -> list[int]:
    """The k CPUs of this process's affinity that were idle the most over 0.3 s (/proc/stat)."""
    mine = sorted(os.sched_getaffinity(0))

    def busy() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *v = line.split()
                    v = list(map(int, v))
                    out[int(name[3:])] = (sum(v), v[3] + v[4])  # total, idle + iowait
        return out

    try:
        a = busy()
        time.sleep(0.3)
        b = busy()
        idle = {c: (b[c][1] - a[c][1]) / max(1, b[c][0] - a[c][0]) for c in mine if c in a and c in b}
        return sorted(sorted(mine, key=lambda c: -idle.get(c, 0.0))[:k])
    except (OSError, ValueError, KeyError):
        return mine[:k]


# -- the report -------------------------------------------------------------------------------------

def _steady(r: dict, variant: str) -> dict[str, float]:
    """Milliseconds per step after the first step, by phase (``other``: the rest of the step)."""
    tot, first = r["split"][variant], r["first"][variant]
    steps = max(1, r["steps"] - 1)
    ms = {k: 1000 * (tot[k] - first[k]) / steps for k in ("step", *SPLIT)}
    ms["other"] = ms["step"] - sum(ms[k] for k in SPLIT)
    return ms


def _threads(ranks: list[dict]) -> str:
    per = [(r["torch_threads"], r["interop_threads"], r["os_threads"]) for r in ranks]
    fmt = lambda x: f"{x[0]}/{x[1]}/{x[2]}"  # noqa: E731
    return fmt(per[0]) if len(set(per)) == 1 else " ".join(f"{_who(r)} {fmt(x)}" for r, x in zip(ranks, per))


def _who(r: dict) -> str:
    return r.get("who") or f"r{r['rank']}"  # a rank, or one of the independent processes (p0, p1)


def _affinity(ranks: list[dict]) -> str:
    def cpus(c: list[int]) -> str:
        return f"{c[0]}-{c[-1]}" if len(c) > 2 and c == list(range(c[0], c[-1] + 1)) else ",".join(map(str, c))
    return " ".join(f"{_who(r)} {{{cpus(r['affinity'])}}}" for r in ranks)


def _total(ranks: list[dict], v: str) -> float:
    """A launch's samples/s: rank 0's (every rank reports the global rate), or the sum over
    independent processes."""
    return sum(r["sps"][v] for r in ranks) if "who" in ranks[0] else ranks[0]["sps"][v]


def _best(rotations: list[list[dict]]) -> dict[str, list[dict]]:
    """Per variant, the ranks of the launch with the best samples/s."""
    variants = rotations[0][0]["sps"]
    return {v: max(rotations, key=lambda ranks: _total(ranks, v)) for v in variants}


def _report(args, res: dict, startup: list[dict], cores: int, t: int, load: list) -> dict:
    best = {label: _best(rotations) for label, rotations in res.items()}
    sps = lambda label, v: _total(best[label][v], v)  # noqa: E731

    def waits(ranks: list[dict], v: str) -> tuple[float, float]:
        st = [_steady(r, v) for r in ranks]
        return (max(x["data"] / x["step"] for x in st), max((x["grad_sync"] + x["flags"]) / x["step"] for x in st))

    ratios = {"trainer_vs_plain": sps("baseline", "trainer") / sps("baseline", "plain")}
    for v, name in (("trainer", "in-memory"), ("h5", "hdf5")):
        ratios[f"scaling_2_{name}"] = sps("2 ranks", v) / (2 * sps("baseline", v))
        ratios[f"vs_1_process_{name}"] = sps("2 ranks", v) / sps("1 process", v)
        ratios[f"ceiling_2_{name}"] = sps("2 independent", v) / (2 * sps("baseline", v))
        ratios[f"vs_2_independent_{name}"] = sps("2 ranks", v) / sps("2 independent", v)
        for label in best:
            d, c = waits(best[label][v], v)
            ratios[f"data_wait_{name}_{label.replace(' ', '_')}"] = d
            ratios[f"comm_wait_{name}_{label.replace(' ', '_')}"] = c
    names = {"plain": "plain PyTorch loop", "trainer": "trainer, in-memory data", "h5": "trainer, HDF5 StreamingReader"}
    runs = {"baseline": f"1 x {t}, pinned", "2 ranks": f"2 x {t}", "1 process": f"1 x {cores}",
            "2 independent": f"2 x (1 x {t}), apart"}
    rows = []
    for v in ("plain", "trainer", "h5"):
        for label in best:
            if v not in best[label]:
                continue
            ranks = best[label][v]
            ratio, what = "", ""
            if v == "plain":
                ratio, what = 1.0, "baseline"
            elif label == "baseline" and v == "trainer":
                ratio, what = ratios["trainer_vs_plain"], "trainer_vs_plain"
            elif label == "2 ranks":
                name = "in-memory" if v == "trainer" else "hdf5"
                ratio, what = ratios[f"scaling_2_{name}"], (
                    f"scaling_2 (vs 2 apart {ratios[f'vs_2_independent_{name}']:.3f}, "
                    f"vs 1 process {ratios[f'vs_1_process_{name}']:.3f})")
            elif label == "2 independent":
                name = "in-memory" if v == "trainer" else "hdf5"
                ratio, what = ratios[f"ceiling_2_{name}"], "ceiling_2: 2 processes at once, no communication"
            wait = "" if v == "plain" else "data {:.1%}, comm {:.1%}".format(*waits(ranks, v))
            rows.append([names[v], runs[label], _threads(ranks), _affinity(ranks), sps(label, v), ratio, what, wait])
    la = lambda x: "/".join(f"{v:.2f}" for v in x)  # noqa: E731
    print(f"train: CNN {MODEL['config']['channels']} on 3x16x16 images, batch {args.batch}/rank, {args.steps} steps, "
          f"best of {args.repeats} launches of each; {cores} cores, {t} thread(s) per rank; samples/s after the "
          f"first step; load average {la(load[0])} before, {la(load[1])} after")
    print(format_table(["variant", "ranks x threads", "threads torch/interop/os", "affinity", "samples_per_s",
                        "ratio", "ratio is", "steady step waiting"], rows))
    split_rows = []
    for label in best:
        for v in ("trainer", "h5"):
            for r in best[label][v]:
                ms, first = _steady(r, v), r["first"][v]
                split_rows.append([names[v].replace("trainer, ", ""), runs[label], _who(r), *(ms[k] for k in SPLIT),
                                   ms["other"], ms["step"], f"{1000 * first['step']:.1f} (data {1000 * first['data']:.1f})"])
    print("\nper rank, milliseconds per step after the first (best launch of each):")
    print(format_table(["data", "run", "rank", "data wait", "fwd+bwd", "grad all-reduce", "flags all-reduce",
                        "optimizer", "other", "step", "first step ms"], split_rows))
    if startup:
        print(f"\n`hpc train CONFIG --nproc 2 train.max_steps=1`: seconds from the command to the end of its first "
              f"optimizer step, best of {args.startup_repeats}, by phase (summary.json \"startup\")")
        print(format_table(["config", "to first step", *PHASES, "command wall s"],
                           [[x["config"], x["to_first_step_s"], *(x["phases_s"].get(p, "") for p in PHASES), x["wall_s"]]
                            for x in startup]))
    return {"config": {k: v for k, v in vars(args).items() if k not in ("func", "worker", "data", "variants", "pin")},
            "cores": cores, "threads_per_rank": t, "load_average": {"before": load[0], "after": load[1]},
            "runs": {label: {v: ranks for v, ranks in b.items()} for label, b in best.items()},
            "ratios": ratios, "startup": startup}


# -- the start-up of `hpc train --nproc 2` ---------------------------------------------------------

def _digits(out: Path) -> None:
    """What the digits configs train on: scikit-learn's digits, or a synthetic stand-in of the same
    shape (64 features, 10 classes, 1,797 rows) where scikit-learn is missing."""
    from hpc.data import WriterConfig
    from hpc.data.sources import shard_source

    try:
        shard_source("sklearn:digits", out, seed=0, config=WriterConfig())
    except ValueError:
        from hpc.data import SynthConfig, synth
        synth(SynthConfig(kind="tabular", samples=1797, features=64, classes=10), out)


def _startup(args, tmp: str) -> list[dict]:
    data = Path(tmp) / "digits"
    _digits(data)
    env = dict(os.environ, HPC_VERIFY_CACHE=str(Path(tmp) / "hash-cache"))
    out = []
    for config in [c for c in args.startup.split(",") if c]:
        best = None
        for i in range(args.startup_repeats):
            run_id = f"startup-{Path(config).stem}-{i}"
            cmd = [sys.executable, "-m", "hpc", "train", config, f"data.dir={data}", f"out_dir={tmp}/runs",
                   f"run_id={run_id}", "train.max_steps=1", "checkpoint.at_end=false", "--nproc", "2"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
            wall = time.perf_counter() - t0
            found = sorted((Path(tmp) / "runs").glob(f"*/{run_id}/summary.json"))
            if proc.returncode != 0 or not found:
                raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
            st = read_json(found[0])["startup"]
            if best is None or st["to_first_step_s"] < best["to_first_step_s"]:
                best = {"config": config, **st, "wall_s": wall}
        out.append(best)
    return out


# -- one rank -------------------------------------------------------------------------------------

def _memory(rank: int, world: int, batch: int, steps: int):
    # Every rank builds the whole global data set (world x batch x steps rows; 78 MB per rank for 2
    # ranks at the defaults) and takes its slice of each global batch (MemoryReader): no copy per step.
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
    for i in range(steps):
        if i == 1:  # timed after the first step, like the trainer's rows
            t0 = time.perf_counter()
        xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
        opt.zero_grad()
        F.cross_entropy(model({"x": xb}), yb).backward()
        opt.step()
    return batch * (steps - 1) / (time.perf_counter() - t0)


class _ThreadCount:
    """The most OS threads this process had, sampled 0.3 s into each timed run."""

    def __init__(self):
        self.most = 0

    def sample_soon(self) -> None:
        def count():
            self.most = max(self.most, len(os.listdir("/proc/self/task")) - 1)  # not this timer's thread
        timer = threading.Timer(0.3, count)
        timer.daemon = True
        timer.start()


def _rendezvous(spec: str, tag: str, timeout_s: float = 300) -> None:
    """Wait until N workers (``spec`` = DIR:N) reached ``tag``: a file each, polled every ms."""
    where, n = spec.rsplit(":", 1)
    Path(where).mkdir(parents=True, exist_ok=True)
    Path(where, f"{tag}.{os.getpid()}").touch()
    end = time.monotonic() + timeout_s
    while len(list(Path(where).glob(f"{tag}.*"))) < int(n):
        if time.monotonic() > end:
            raise RuntimeError(f"rendezvous {tag}: the other workers did not arrive within {timeout_s:g}s")
        time.sleep(0.001)


def _worker(args) -> int:
    if args.pin:  # before torch and MPI start their threads: every thread of this rank inherits it
        os.sched_setaffinity(0, {int(c) for c in args.pin.split(",")})
    import torch

    from hpc.train import run as train
    from hpc.train.inputs import Data
    from hpc.train.memdata import MemoryReader

    logging.getLogger("hpc.train").setLevel(logging.WARNING)
    w = world_from_env()
    out = str(Path(args.worker).parent / "runs")
    variants = args.variants.split(",")
    x, y = _memory(w.rank, w.size, args.batch, args.steps)
    schema = {"fields": {"x": {"dtype": "float32", "shape": list(SHAPE)}}, "num_classes": CLASSES}
    best = {v: 0.0 for v in variants}
    split, first, whole, threads = {}, {}, {}, _ThreadCount()
    for rep in range(args.repeats):
        if "plain" in variants:
            best["plain"] = max(best["plain"], _plain(x, y, args.batch, args.steps))
        for v in ("trainer", "h5"):
            if v not in variants:
                continue
            if args.rendezvous:
                _rendezvous(args.rendezvous, f"{v}-{rep}")
            threads.sample_soon()
            if v == "trainer":
                reader = MemoryReader({"x": x, "y": y}, w.rank, w.size, args.batch, shuffle=False)
                s = train(_config(out, f"mem{rep}", args.batch, w.size, args.steps, "memory"),
                          data=Data(schema, reader))
            else:
                s = train(_config(out, f"h5{rep}", args.batch, w.size, args.steps, args.data))
            tot, one = s["step_split_s"], s["first_step_split_s"]
            # After the first step, like the plain loop: it also fills the reader's first window and
            # pays first-call costs (shown apart in the split table).
            steady = (tot["samples"] - one["samples"]) / max(tot["step"] - one["step"], 1e-9)
            if steady > best[v]:
                best[v], split[v], first[v], whole[v] = steady, tot, one, s["samples_per_s"]
    atomic_write_json(f"{args.worker}.rank{w.rank}", {
        "rank": w.rank, "ranks": w.size, "steps": args.steps, "sps": best, "sps_with_first_step": whole,
        "split": split, "first": first,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "os_threads": threads.most,
        "affinity": sorted(os.sched_getaffinity(0))})
    return 0
