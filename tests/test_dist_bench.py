"""`hpc bench allreduce`: the gradient-set shape (pure) and one tiny real run (no timing asserted).

With Horovod installed (scripts/build-horovod.sh --install) the tiny run must fill the Horovod
columns and its fusion-threshold table; without it they read n/a, which fails under CI=true (or
HPC_REQUIRE_CLUSTER=1), where Horovod must be there.
"""

import importlib.util
import json

import pytest

from conftest import REQUIRE_CLUSTER
from hpc.bench.allreduce import model_like_sizes
from hpc.cli import main

HOROVOD = importlib.util.find_spec("horovod") is not None


def test_model_like_sizes():
    sizes = model_like_sizes(100 << 20, 200)
    assert len(sizes) == 200 and sum(sizes) * 4 == 100 << 20 and min(sizes) >= 1
    weights, biases = sizes[0::2], sizes[1::2]
    assert min(weights) > max(biases)  # weight matrices dwarf biases, as in a real model
    assert model_like_sizes(100 << 20, 200) == sizes  # deterministic: every rank builds the same set
    with pytest.raises(ValueError, match="--tensors"):
        model_like_sizes(8, 200)


def test_bad_arguments_exit_2(capsys):
    assert main(["bench", "allreduce", "--ranks", "two"]) == 2
    assert "--ranks 'two'" in capsys.readouterr().err
    assert main(["bench", "allreduce", "--horovod-fusion-mb", "0"]) == 2
    assert "--horovod-fusion-mb '0'" in capsys.readouterr().err


@pytest.mark.mpi
def test_tiny_run_writes_ratios(tmp_path, capsys):
    out = tmp_path / "ar.json"
    if not HOROVOD and REQUIRE_CLUSTER:
        pytest.fail("Horovod is not installed (scripts/build-horovod.sh --install): CI must fill the bench's "
                    "Horovod columns")
    assert main(["bench", "allreduce", "--ranks", "2", "--mb", "2", "--tensors", "20",
                 "--bucket-mb", "0.5,1", "--horovod-fusion-mb", "0.5", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sync_vs_raw" in printed and "bucket size sweep" in printed
    res = json.loads(out.read_text())["results"][0]
    assert res["ranks"] == 2 and set(res["ratios"]) == {"sync_vs_raw", "sync_vs_per_tensor", "sync_vs_horovod"}
    assert res["buckets"]["0.5"] > res["buckets"]["1"] >= 2
    assert all(v > 0 for v in res["ms"].values())
    header = next(line for line in printed.splitlines() if "horovod_ms" in line)
    row = printed.splitlines()[printed.splitlines().index(header) + 2]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    if HOROVOD:
        # Horovod with its default fusion threshold (128 MB) in the main table, 0.5 MB in its own table
        assert {"horovod", "horovod_fusion_0.5"} <= set(res["ms"]) and res["ratios"]["sync_vs_horovod"] > 0
        assert float(cells["horovod_ms"].replace(",", "")) > 0 and float(cells["sync_vs_horovod"].replace(",", "")) > 0, row
        assert "Horovod fusion threshold sweep" in printed and "128 (default)" in printed
    else:
        assert cells["horovod_ms"] == "n/a (not installed)" and res["ratios"]["sync_vs_horovod"] is None


# -- hpc bench train (issue 20): the rows, per-rank threads/affinity, the step split, the start-up ----

def test_startup_phases_from_the_marks():
    from hpc.train.trainer import startup_phases

    marks = {"launch": 100.0, "mpiexec": 101.0, "process": 101.25, "entered": 102.5, "preflight": 102.5,
             "comm": 102.625, "rundir": 102.75, "data": 103.0, "model": 104.0, "first_step": 104.5}
    st = startup_phases(marks)
    assert st["to_first_step_s"] == 4.5 and st["from"] == "launch"
    assert st["phases_s"] == {"cli": 1.0, "spawn": 0.25, "imports": 1.25, "preflight": 0.0, "comm init": 0.125,
                              "run dir": 0.125, "data open": 0.25, "model build": 1.0, "first step": 0.5}
    # Started by mpiexec/srun directly: from this process's start, no cli/spawn phases.
    st = startup_phases({k: v for k, v in marks.items() if k not in ("launch", "mpiexec")})
    assert st["from"] == "process" and st["to_first_step_s"] == 3.25 and "cli" not in st["phases_s"]


def test_launch_marks_come_from_the_launcher_and_stale_ones_are_dropped():
    import time

    from hpc.dist.spawn import T_LAUNCH_ENV, T_MPIEXEC_ENV, launch_marks, process_start_time

    me = process_start_time()
    if me is None:
        pytest.skip("no /proc")
    assert 0 <= time.time() - me < 24 * 3600  # this process started today, on the time.time() scale
    ok = launch_marks({T_LAUNCH_ENV: str(me - 2), T_MPIEXEC_ENV: str(me - 1)})
    assert ok["launch"] == me - 2 and ok["mpiexec"] == me - 1 and abs(ok["process"] - me) < 0.05
    stale = launch_marks({T_LAUNCH_ENV: str(me - 7200), T_MPIEXEC_ENV: str(me - 7100)})  # an older launch's
    assert set(stale) == {"process"}
    assert set(launch_marks({T_MPIEXEC_ENV: "not a time"})) == {"process"}


@pytest.mark.mpi
def test_bench_train_rows_threads_affinity_split_and_startup(tmp_path, capsys):
    import os

    from hpc.dist.spawn import threads_per_rank

    out = tmp_path / "train.json"
    assert main(["bench", "train", "--batch", "8", "--steps", "10", "--repeats", "1",
                 "--startup", "digits_softmax", "--startup-repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("threads torch/interop/os", "affinity", "trainer_vs_plain", "scaling_2", "ceiling_2", "grad all-reduce",
                 "first step ms", "to first step", "model build", "digits_softmax", "load average"):
        assert text in printed, text
    res = json.loads(out.read_text())
    cores, t = os.cpu_count(), threads_per_rank(2, os.cpu_count())
    runs = res["runs"]  # per launch kind and variant: the best launch's ranks
    assert [len(runs[k]["trainer"]) for k in ("baseline", "2 ranks", "1 process", "2 independent")] == [1, 2, 1, 2]
    apart = runs["2 independent"]["h5"]  # two 1-rank processes at once, each on its own t CPUs
    assert [p["who"] for p in apart] == ["p0", "p1"] and all(len(p["affinity"]) == t for p in apart)
    assert not set(apart[0]["affinity"]) & set(apart[1]["affinity"])
    # The launcher's thread counts reach torch in every rank; the baseline is pinned to t CPUs, the
    # 2-rank and whole-machine runs are not bound.
    (base,) = runs["baseline"]["trainer"]
    assert base["torch_threads"] == t and len(base["affinity"]) == t and base["sps"]["plain"] > 0
    allowed = sorted(os.sched_getaffinity(0))
    for r in runs["2 ranks"]["h5"]:
        assert r["torch_threads"] == t and r["affinity"] == allowed and r["os_threads"] >= 1
        assert set(r["split"]["trainer"]) >= {"data", "fwd_bwd", "grad_sync", "flags", "optim", "step"}
        assert r["first"]["h5"]["samples"] == 16 and r["split"]["h5"]["samples"] == 160
    assert runs["1 process"]["trainer"][0]["torch_threads"] == cores
    assert {"trainer_vs_plain", "scaling_2_in-memory", "scaling_2_hdf5", "ceiling_2_hdf5"} <= set(res["ratios"])
    (st,) = res["startup"]
    assert st["config"] == "digits_softmax" and st["from"] == "launch" and st["to_first_step_s"] > 0
    assert set(st["phases_s"]) == {"cli", "spawn", "imports", "preflight", "comm init", "run dir", "data open",
                                   "model build", "first step"}


def test_the_cli_parser_imports_nothing_heavy():
    """Every command's parser (what `hpc --help` and the start of every `hpc ...` build) loads none of
    the heavy libraries: they are imported where a command uses them (start-up, issue 20)."""
    import subprocess
    import sys

    heavy = ("torch", "h5py", "pyarrow", "pandas", "submitit", "tensorboard", "mpi4py", "mlflow", "onnxruntime")
    code = ("import sys\nfrom hpc.cli import build_parser\nbuild_parser()\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)
