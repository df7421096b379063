"""`hpc infer` safety (issue 17): it never deletes files it cannot prove it wrote, one job per
output directory (atomic claim), ranks score one pinned model version, clear exit-2 errors, and no
non-finite predictions published unless asked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import mpi_env
from hpc.cli import main
from hpc.data.manifest import load_manifest
from hpc.dist.world import World
from hpc.infer import job as infer_job
from hpc.infer.job import InferConfig, run as run_job
from hpc.infer.output import JOB, LOCK, SUCCESS, _lock
from hpc.registry import Registry
from hpc.registry.layout import SUMS, WEIGHTS, format_sums
from hpc.util.io import sha256_file
from test_infer import world  # noqa: F401 (the fixture: data in 7 shards of 110, clf@1/2)
from test_registry import make_run_dir


@pytest.fixture(scope="module")
def nan_model(world):
    """A version whose weights are NaN (registered as is: its checksums match) in the same registry."""
    train = load_manifest(world["train"])
    nan_run = make_run_dir(world["root"] / "run-nan", schema=train.schema(), stats=train.stats, seed=3)
    w = nan_run / "models" / "best.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(w)).items()}, str(w))
    world["reg"].add(nan_run, "nanclf")
    world["reg"].promote("nanclf", 1, "production")
    return "nanclf@production"


def argv(world, out, *extra, model="clf@production"):
    return ["infer", "--model", model, "--input", str(world["test"]), "--output", str(out),
            "--registry", str(world["reg"].root), *extra]


def foreign_dataset(out: Path) -> dict[str, bytes]:
    """What pyarrow / Spark leave in a dataset directory: part-* files and _SUCCESS, no _JOB.json."""
    out.mkdir(parents=True)
    files = {"part-0.parquet": b"PAR1 customer data PAR1",
             "part-00000-1b2c3d4e-aaaa-bbbb-cccc-0123456789ab-c000.snappy.parquet": b"PAR1 spark PAR1",
             "part-1.csv": b"a,b\n1,2\n", "_SUCCESS": b""}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


# ------------------------------------------------------------------ item 1: never delete others' data
def test_foreign_dataset_without_job_json_is_refused_and_kept(world, tmp_path, capsys):
    out = tmp_path / "customer"
    files = foreign_dataset(out)
    assert main(argv(world, out)) == 2
    err = capsys.readouterr().err
    assert "no _JOB.json" in err and "part-0.parquet" in err and "--overwrite" in err
    assert contents(out) == files  # every byte still there; no _LOCK or _JOB.json left behind


def test_overwrite_removes_foreign_dataset_naming_each_file(world, tmp_path, capsys):
    out = tmp_path / "customer"
    files = foreign_dataset(out)
    assert main(argv(world, out, "--overwrite")) == 0
    said = capsys.readouterr().out
    assert "--overwrite removed 4" in said
    for name in files:
        assert name in said
    assert (out / SUCCESS).exists() and (out / JOB).exists() and not (out / LOCK).exists()
    assert "part-0.parquet" not in os.listdir(out)


def test_output_holding_other_files_is_refused_even_with_overwrite(world, tmp_path, capsys):
    out = tmp_path / "mixed"
    foreign_dataset(out)
    (out / "README").write_text("mine")
    assert main(argv(world, out, "--overwrite")) == 2
    assert "did not write (README)" in capsys.readouterr().err
    assert len(os.listdir(out)) == 5


def test_lock_is_exclusive_and_claim_refuses_while_held(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    claim = _lock(out)  # another live job holds the directory
    (out / ".part-00000.parquet.abc.tmp").write_bytes(b"half written by the first job")
    with pytest.raises(ValueError, match="another hpc infer is writing"):
        _lock(out)
    assert main(argv(world, out)) == 2
    assert "another hpc infer is writing" in capsys.readouterr().err
    assert (out / ".part-00000.parquet.abc.tmp").exists()  # nothing of the first job's removed
    claim.release()
    assert not (out / LOCK).exists()


def _start_slow_job(world, out: Path) -> subprocess.Popen:
    env = mpi_env({"HPC_INFER_TEST_DELAY_S": "1.5", "PYTHONPATH": str(Path(__file__).parents[1])})
    return subprocess.Popen([sys.executable, "-m", "hpc", *argv(world, out, "--batch-size", "16")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc, timeout=60.0) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def test_concurrent_jobs_one_wins_other_exits_2_and_removes_nothing(world, tmp_path, capsys):
    """Same job twice at once (the worst case: same identity, which a rerun resumes): the second
    must not clear the first's temporary files, nor write anything."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    first = _start_slow_job(world, out)
    try:
        _wait_for(lambda: (out / "_parts").is_dir() and any((out / "_parts").iterdir()), first)
        before = sorted(os.listdir(out))
        assert main(argv(world, out, "--batch-size", "16")) == 2
        assert "another hpc infer is writing" in capsys.readouterr().err
        assert set(before) <= set(os.listdir(out)) | {n for n in before if n.endswith(".tmp")}
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert main(argv(world, ref, "--batch-size", "16")) == 0
    assert {n: b for n, b in contents(out).items() if n.startswith("part-")} == \
           {n: b for n, b in contents(ref).items() if n.startswith("part-")}
    assert not (out / LOCK).exists()


def test_rerun_after_kill9_is_not_locked_out_and_resumes(world, tmp_path, capsys):
    out = tmp_path / "out"
    first = _start_slow_job(world, out)
    _wait_for(lambda: (out / "_parts").is_dir() and any((out / "_parts").iterdir()), first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert (out / LOCK).exists() and not (out / SUCCESS).exists()
    assert main(argv(world, out, "--batch-size", "16")) == 0  # the kernel dropped the dead job's lock
    assert "skipped" in capsys.readouterr().out
    assert (out / SUCCESS).exists() and not (out / LOCK).exists()


# ------------------------------------------------------------------ item 13: clear exit-2 errors
def test_output_naming_a_file_exits_2(world, tmp_path, capsys, monkeypatch):
    f = tmp_path / "preds.parquet"
    f.write_bytes(b"somebody's file")
    assert main(argv(world, f)) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(argv(world, f / "sub")) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    monkeypatch.setattr("hpc.cli.infer.launch_local", lambda *a: pytest.fail("ranks started"))
    assert main(argv(world, f, "--nproc", "2")) == 2  # refused before any rank starts
    assert "is a file, not a directory" in capsys.readouterr().err
    assert f.read_bytes() == b"somebody's file"


def _tamper_weights(reg: Registry, name: str, version: int, data: bytes) -> Path:
    vdir = reg.root / name / str(version)
    (vdir / WEIGHTS).write_bytes(data)
    sums = {p.name: sha256_file(p) for p in vdir.iterdir() if p.is_file() and p.name != SUMS}
    (vdir / SUMS).write_text(format_sums(sums))  # checksums match: the bytes themselves are bad
    return vdir / WEIGHTS


@pytest.mark.parametrize("kind", ["malformed", "wrong_shape"])
def test_bad_weights_name_the_file(world, tmp_path, capsys, kind):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.add(make_run_dir(tmp_path / "run", schema=Registry(world["reg"].root).card("clf@1")["schema"]), "bad")
    reg.promote("bad", 1, "production")
    if kind == "malformed":
        data = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    else:
        state = load_file(str(tmp_path / "run" / "models" / "best.safetensors"))
        k = next(iter(state))
        state[k] = torch.zeros(*(s + 1 for s in state[k].shape))
        tmp = tmp_path / "w.safetensors"
        save_file(state, str(tmp))
        data = tmp.read_bytes()
    path = _tamper_weights(reg, "bad", 1, data)
    rc = main(["infer", "--model", "bad@production", "--input", str(world["test"]),
               "--output", str(tmp_path / "out"), "--registry", str(root)])
    err = capsys.readouterr().err
    assert rc == 2 and str(path) in err and "Traceback" not in err


# ------------------------------------------------------------------ item 4: non-finite predictions
def test_nonfinite_predictions_refused_naming_partition(world, nan_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(world, out, model=nan_model)) == 2
    err = capsys.readouterr().err
    assert "part-00000.parquet" in err and "110 of 110 row(s) have non-finite" in err
    assert "--allow-nonfinite" in err
    assert not list(out.glob("part-*")) and not (out / SUCCESS).exists()
    assert main(argv(world, out, "--allow-nonfinite", model=nan_model)) == 0
    assert (out / SUCCESS).exists()


# ------------------------------------------------------------------ item 12: one alias resolution
def test_registry_load_reads_the_alias_once(world, monkeypatch):
    """A promotion between two alias reads of one load (production 1 -> 2) must not refuse it."""
    reg = Registry(world["reg"].root)
    seen = iter([{"production": 1}, {"production": 2}, {"production": 2}, {"production": 2}])
    monkeypatch.setattr(Registry, "aliases", lambda self, name: next(seen))
    _, card = reg.load("clf@production")
    assert card["version"] == 1


class _Rank1Comm:
    """Rank 1 of 2: its broadcasts return what rank 0 sent (scripted), the rest are no-ops."""

    def __init__(self, from_rank0: list):
        self.world = World(rank=1, size=2, local_rank=1, local_size=2, launcher="openmpi")
        self.from_rank0 = list(from_rank0)

    def broadcast_object(self, obj, root=0):
        return self.from_rank0.pop(0)

    def allgather_object(self, obj):
        return [obj, obj]

    def barrier(self):
        pass


def test_ranks_score_the_version_rank0_resolved(world, tmp_path, monkeypatch):
    """Rank 0 resolved clf@production to clf@1 and claimed the output; then production moved to 2
    before rank 1 loaded: rank 1 must still score with clf@1."""
    reg = Registry(world["reg"].root)
    out = tmp_path / "out"
    cfg = InferConfig(model="clf@production", input=str(world["test"]), output=str(out),
                      registry=str(reg.root))
    run_job(cfg, log=lambda s: None)  # rank 0's view of the job: its _JOB.json and partitions
    for p in out.glob("part-*"):
        p.unlink()
    reg.promote("clf", 2, "production")
    try:
        summary = infer_job.run(cfg, comm=_Rank1Comm([("ok", ["clf@1"]), ("ok", "run")]), log=lambda s: None)
    finally:
        reg.promote("clf", 1, "production")
    assert summary["rows_written"] > 0
    versions = {int(v) for p in out.glob("part-*.parquet") for v in pd.read_parquet(p)["model_version"]}
    assert versions == {1}
