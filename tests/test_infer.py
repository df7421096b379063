"""Batch inference: exact predictions, schema checks, exactly-once output across kill -9 and reruns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.csv as pcsv
import pyarrow.dataset as pads
import pytest
import torch

from conftest import mpi_env, run_mpi
from hpc.cli import main
from hpc.data.manifest import load_manifest
from hpc.data.reader import iter_shard
from hpc.data.synth import SynthConfig, synth
from hpc.data.writer import WriterConfig
from hpc.infer.job import InferConfig, run as run_job
from hpc.infer.output import sidecar_path
from hpc.registry import Registry
from test_registry import make_run_dir

FEATURES, CLASSES = 6, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tabular data in 7 uneven shards per split; two models trained on 'train' (by hand), promoted."""
    root = tmp_path_factory.mktemp("infer")
    ms = synth(SynthConfig(kind="tabular", samples=1400, features=FEATURES, classes=CLASSES, seed=3),
               root / "data", split="train=0.5,test=0.5", writer=WriterConfig(samples_per_shard=110))
    train = ms["train"]
    reg = Registry(root / "reg")
    for name, seed in (("clf", 0), ("clf", 1), ("other", 2)):
        run = make_run_dir(root / f"run-{name}-{seed}", schema=train.schema(), stats=train.stats, seed=seed)
        reg.add(run, name)
    reg.promote("clf", 1, "production")
    reg.promote("other", 1, "production")
    return {"root": root, "reg": reg, "train": root / "data" / "train", "test": root / "data" / "test"}


def job(world, out, **kw) -> dict:
    kw.setdefault("model", "clf@production")
    return run_job(InferConfig(input=str(kw.pop("input", world["test"])), output=str(out),
                               registry=str(world["reg"].root), **kw), log=lambda s: None)


def read_parts(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out).sort_values(["shard", "index"]).reset_index(drop=True)


def part_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*"))}


def test_predictions_equal_single_process_forward(world, tmp_path):
    out = tmp_path / "out"
    job(world, out, batch_size=32)
    df = read_parts(out)
    m = load_manifest(world["test"])
    assert len(df) == m.total_samples and list(df["row_id"]) == list(range(m.total_samples))
    # Reference: the model in this process, inputs normalized by the reader with the *training*
    # statistics (the test split has its own, different ones), batches from each shard's start.
    model, card = world["reg"].load("clf@production")
    train_stats = {"x": load_manifest(world["train"]).stats["x"]}
    assert train_stats["x"]["mean"] != m.stats["x"]["mean"]
    probs = []
    with torch.inference_mode():
        for s in range(len(m.shards)):
            for b in iter_shard(world["test"], s, 32, normalize=train_stats):
                probs.append(torch.softmax(model(b), dim=-1))
    ref = torch.cat(probs).numpy()
    got = np.stack(df["probabilities"].to_numpy())
    assert got.dtype == np.float32 and np.array_equal(got, ref)  # exact, not close
    assert np.array_equal(df["prediction"].to_numpy(), ref.argmax(1))
    assert set(df["model"]) == {"clf"} and set(df["model_version"]) == {1}
    man = json.loads((out / "_MANIFEST.json").read_text())
    assert man["rows"] == m.total_samples and man["input_manifest_sha256"] == m.sha256
    assert [p["rows"] for p in man["partitions"]] == m.sample_counts
    assert man["models"][0]["name"] == "clf" and man["models"][0]["version"] == 1


def test_schema_mismatch_exits_nonzero_naming_it(world, tmp_path, capsys):
    ms = synth(SynthConfig(kind="tabular", samples=50, features=FEATURES - 1, classes=CLASSES),
               tmp_path / "d5", split="all=1")
    argv = ["infer", "--model", "clf@production", "--input", str(tmp_path / "d5" / "all"),
            "--output", str(tmp_path / "out"), "--registry", str(world["reg"].root)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "field 'x': model expects float32[6], data has float32[5]" in err and "clf@1" in err
    assert not (tmp_path / "out").exists()
    assert ms["all"].total_samples == 50


def test_unpromoted_refused_and_output_owned_by_job(world, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["infer", "--input", str(world["test"]), "--output", str(out), "--registry", str(world["reg"].root)]
    assert main(base + ["--model", "clf@2"]) == 2
    assert "--allow-unpromoted" in capsys.readouterr().err
    assert main(base + ["--model", "clf@2", "--allow-unpromoted"]) == 0
    assert main(base + ["--model", "clf@production"]) == 2  # another model: refused, named
    err = capsys.readouterr().err
    assert "written by another job" in err and "--overwrite" in err
    assert "models clf@2 (there) vs clf@1 (this job)" in err
    assert main(base + ["--model", "clf@production", "--batch-size", "7"]) == 2  # other settings too
    assert set(read_parts(out)["model_version"]) == {2}
    assert main(base + ["--model", "clf@production", "--overwrite"]) == 0
    assert set(read_parts(out)["model_version"]) == {1}
    (out / "notes.txt").write_text("mine")
    assert main(base + ["--model", "clf@production", "--overwrite"]) == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err


def test_rerun_skips_valid_partitions_and_redoes_damaged_ones(world, tmp_path):
    out = tmp_path / "out"
    first = job(world, out)
    before = part_bytes(out)
    assert job(world, out)["state"] == "complete"
    (out / "_SUCCESS").unlink()  # killed between _MANIFEST.json and _SUCCESS: nothing is rescored
    again = job(world, out)
    assert again["ranks"][0]["written"] == 0 and (out / "_SUCCESS").exists() and part_bytes(out) == before
    (out / "part-00002.parquet").unlink()
    p4 = out / "part-00004.parquet"
    p4.write_bytes(p4.read_bytes()[:-10] + b"0123456789")  # same size, wrong bytes
    (out / ".part-00005.parquet.x.tmp").write_bytes(b"half a file")  # a killed run's leftover
    again = job(world, out)
    assert again["state"] == "done"
    assert again["ranks"][0]["written"] == 2 and again["ranks"][0]["skipped"] == len(before) - 2
    assert part_bytes(out) == before
    assert not list(out.glob(".*.tmp")) and (out / "_SUCCESS").exists()
    assert again["manifest"]["partitions"] == first["manifest"]["partitions"]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "hdf5"])
def test_downstream_readers_see_counts_ids_and_columns(world, tmp_path, fmt):
    out = tmp_path / fmt
    job(world, out, format=fmt, top_k=2 if fmt != "hdf5" else 0, batch_size=50)
    m = load_manifest(world["test"])
    n = m.total_samples
    shard_of = np.repeat(np.arange(len(m.shards)), m.sample_counts)
    index_of = np.concatenate([np.arange(c) for c in m.sample_counts])
    if fmt == "parquet":
        df = pd.read_parquet(out)
        table = pads.dataset(out, format="parquet").to_table()
        assert table.num_rows == n and table.column_names == list(df.columns)
        assert list(df.columns) == ["shard", "index", "row_id", "prediction", "top_k_classes",
                                    "top_k_probs", "model", "model_version"]
        assert all(len(v) == 2 for v in df["top_k_classes"])
        assert (np.stack(df["top_k_classes"])[:, 0] == df["prediction"]).all()
    elif fmt == "csv":
        parts = sorted(out.glob("part-*.csv"))
        df = pd.concat([pd.read_csv(p) for p in parts], ignore_index=True)
        assert sum(pcsv.read_csv(p).num_rows for p in parts) == n
        assert "top_k_classes_1" in df.columns and "top_k_probs_0" in df.columns
    else:
        cols = {}
        for p in sorted(out.glob("part-*.h5")):
            with h5py.File(p, "r") as f:
                assert f.attrs["model"] == "clf" and f["probabilities"].shape[1] == CLASSES
                for k in ("shard", "index", "row_id", "prediction"):
                    cols.setdefault(k, []).append(f[k][:])
        df = pd.DataFrame({k: np.concatenate(v) for k, v in cols.items()})
    assert len(df) == n
    assert np.array_equal(df["shard"].to_numpy(), shard_of) and np.array_equal(df["index"].to_numpy(), index_of)
    assert not df.duplicated(["shard", "index"]).any()
    assert set(df["prediction"]) <= set(range(CLASSES))
    for p in out.glob("part-*"):
        assert p.stat().st_mode & 0o040, f"{p} is not group-readable"


def test_adhoc_ensemble_vote_records_members(world, tmp_path):
    out = tmp_path / "ens"
    job(world, out, model="clf@production,other@1", combine="vote")
    df = read_parts(out)
    single = {}
    for ref in ("clf@production", "other@1"):
        o = tmp_path / ref.replace("@", "_")
        job(world, o, model=ref)
        single[ref] = np.stack(read_parts(o)["probabilities"].to_numpy())
    votes = sum(np.eye(CLASSES, dtype=np.float32)[p.argmax(1)] for p in single.values()) / 2
    assert np.array_equal(np.stack(df["probabilities"].to_numpy()), votes)
    assert set(df["model"]) == {"clf@1+other@1"} and set(df["model_version"]) == {-1}
    man = json.loads((out / "_MANIFEST.json").read_text())
    assert [(m["name"], m["version"]) for m in man["models"]] == [("clf", 1), ("other", 1)]
    assert man["combine"] == "vote"


def _rank_pids(marker: str, rank: int) -> list[int]:
    """Processes whose command line mentions ``marker`` and whose MPI rank is ``rank``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker not in (d / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            pids.append(int(d.name))
    return pids


@pytest.mark.mpi
def test_kill9_of_a_rank_then_rerun_is_byte_identical(world, tmp_path):
    reg = str(world["reg"].root)
    args = ["infer", "--model", "clf@production", "--input", str(world["test"]), "--registry", reg,
            "--batch-size", "16"]
    m = load_manifest(world["test"])
    # Uninterrupted 2-rank run through `--nproc 2` (launch_local -> real mpiexec).
    a = tmp_path / "uninterrupted"
    r = subprocess.run([sys.executable, "-m", "hpc", *args, "--output", str(a), "--nproc", "2"],
                       capture_output=True, text=True, timeout=180, env=mpi_env())
    assert r.returncode == 0, r.stderr[-3000:]
    man_a = json.loads((a / "_MANIFEST.json").read_text())
    assert man_a["world_size"] == 2 and {x["rank"] for x in man_a["ranks"]} == {0, 1}
    assert all(x["written"] > 0 for x in man_a["ranks"])

    # The same job, slowed after each partition, and rank 1 killed with SIGKILL mid-run.
    b = tmp_path / "killed"
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    proc = subprocess.Popen([mpiexec, "-n", "2", "--oversubscribe", sys.executable, "-m", "hpc", *args,
                             "--output", str(b)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=mpi_env({"HPC_INFER_TEST_DELAY_S": "0.5"}))
    try:
        deadline = time.time() + 120
        # A partition is complete once its sidecar is written (after the part file's rename): wait
        # for two complete ones, or the kill may land between a part file and its sidecar.
        while (len([s for s in range(len(m.shards)) if sidecar_path(b, s).exists()]) < 2
               and time.time() < deadline and proc.poll() is None):
            time.sleep(0.05)
        victims = _rank_pids(str(b), 1)
        assert victims and proc.poll() is None, "the run ended before it could be killed"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not (b / "_SUCCESS").exists() and not (b / "_MANIFEST.json").exists()
    assert 2 <= len(list(b.glob("part-*.parquet"))) < len(m.shards)

    rerun = run_mpi(2, ["python", "-m", "hpc", *args, "--output", str(b)], timeout=180)
    assert "skipped" in rerun.stdout
    man_b = json.loads((b / "_MANIFEST.json").read_text())
    assert sum(x["skipped"] for x in man_b["ranks"]) >= 2  # the killed run's partitions were kept
    assert (b / "_SUCCESS").exists()
    assert part_bytes(b) == part_bytes(a)  # byte-identical to the uninterrupted run
    assert man_b["partitions"] == man_a["partitions"]
    df = read_parts(b)
    assert len(df) == m.total_samples and not df.duplicated(["shard", "index"]).any()
    assert list(df["row_id"]) == list(range(m.total_samples))


def test_bench_infer_prints_its_table(world, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "infer", "--model", "clf@production", "--input", str(world["test"]),
                 "--registry", str(world["reg"].root), "--repeats", "1", "--nproc", "",
                 "--batch-size", "64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "forward only (in-memory batches)" in text and "infer_vs_forward = " in text
    res = json.loads(out.read_text())
    assert res["rows"] == load_manifest(world["test"]).total_samples and res["infer_vs_forward"] > 0
    assert res["scaling_2_ranks"] is None  # not measured with --nproc ''


def test_ratings_output_carries_user_item_and_predictions(tmp_path):
    ms = synth(SynthConfig(kind="ratings", samples=500, users=30, items=20), tmp_path / "r",
               split="train=1", writer=WriterConfig(samples_per_shard=200))
    m = ms["train"]
    reg = Registry(tmp_path / "reg")
    reg.add(make_run_dir(tmp_path / "run", schema=m.schema(), stats=m.stats, family="mf", config={}), "rec")
    reg.promote("rec", 1, "production")
    run_job(InferConfig(model="rec@production", input=str(tmp_path / "r" / "train"), output=str(tmp_path / "o"),
                        registry=str(reg.root), batch_size=64), log=lambda s: None)
    df = read_parts(tmp_path / "o")
    assert list(df.columns) == ["shard", "index", "row_id", "item", "user", "prediction", "model", "model_version"]
    users = np.concatenate([b["user"].numpy() for s in range(len(m.shards)) for b in iter_shard(m, s, 500)])
    assert np.array_equal(df["user"].to_numpy(), users) and df["prediction"].dtype == np.float32
    model, _ = reg.load("rec@production")
    with torch.inference_mode():
        ref = torch.cat([model(b) for s in range(len(m.shards)) for b in iter_shard(m, s, 64)]).numpy()
    assert np.array_equal(df["prediction"].to_numpy(), ref)
