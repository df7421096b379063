"""`hpc data verify` catches truncation, a flipped byte, a missing file; and the mpiexec union test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from hpc.cli import main as cli
from hpc.data import SynthConfig, WriterConfig, synth
from conftest import run_mpi
from _data_util import make_split


@pytest.fixture
def dataset(tmp_path):
    synth(SynthConfig(kind="images", samples=600, size=8, classes=3), tmp_path,
          split="train=0.8,val=0.2", writer=WriterConfig(samples_per_shard=200, compression="gzip"))
    return tmp_path


def test_clean_data_set_verifies(dataset, capsys):
    assert cli(["data", "verify", str(dataset)]) == 0
    assert "OK: 4 shard(s) checked, 0 problem(s)" in capsys.readouterr().out


def test_truncated_shard_is_named(dataset, capsys):
    p = dataset / "train" / "shard-00001.h5"
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    assert cli(["data", "verify", str(dataset)]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{p.resolve()}: size {os.path.getsize(p)} bytes"), lines
    assert "truncated" in lines[0]
    assert "FAILED" in out.err


def test_flipped_byte_is_named(dataset, capsys):
    p = dataset / "val" / "shard-00000.h5"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    assert cli(["data", "verify", str(dataset / "val")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"{p.resolve()}: sha256") for line in lines), lines
    # --quick (no checksums) cannot see a flipped byte that keeps the size: that is its documented cost.
    assert cli(["data", "verify", "--quick", str(dataset / "val")]) == 0


def test_missing_shard_and_missing_manifest(dataset, tmp_path, capsys):
    (dataset / "train" / "shard-00000.h5").unlink()
    assert cli(["data", "verify", str(dataset)]) == 1
    assert "shard-00000.h5: missing" in capsys.readouterr().out
    assert cli(["data", "verify", str(tmp_path / "nowhere")]) == 1


@pytest.mark.mpi
def test_mpiexec_4_ranks_union_is_whole_data_set_once(tmp_path):
    split = tmp_path / "train"
    make_split(split, [101, 57, 230, 12, 99])  # uneven shards, 499 samples
    out = tmp_path / "out"
    out.mkdir()
    worker = Path(__file__).with_name("_data_util.py")
    run_mpi(4, [sys.executable, str(worker), str(split), str(out), "16", "2"],
            env={"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])})
    for epoch in range(2):
        parts = [np.load(out / f"rank{r}-epoch{epoch}.npz") for r in range(4)]
        assert len({int(p["batches"]) for p in parts}) == 1
        ids = np.concatenate([p["ids"] for p in parts])
        assert np.array_equal(np.sort(ids), np.arange(499))
        for p in parts:  # rank-dependent content: each rank saw real rows (x encodes the id)
            assert np.array_equal(p["x"], p["ids"].astype(np.float32))
        sizes = [len(p["ids"]) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    e0 = np.load(out / "rank0-epoch0.npz")["ids"]
    e1 = np.load(out / "rank0-epoch1.npz")["ids"]
    assert not np.array_equal(e0, e1)
