"""Real mpiexec runs: each rank reads its part (the union is the data set, once); a mid-epoch read
failure on one rank stops every rank instead of hanging them in a collective."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_mpi
from _data_util import make_split

WORKER = Path(__file__).with_name("_data_util.py")


def _env() -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.mpi
def test_mpiexec_4_ranks_union_is_whole_data_set_once(tmp_path):
    split = tmp_path / "train"
    make_split(split, [101, 57, 230, 12, 99])  # uneven shards, 499 samples
    out = tmp_path / "out"
    out.mkdir()
    run_mpi(4, [sys.executable, str(WORKER), str(split), str(out), "16", "2"], env=_env())
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


@pytest.mark.mpi
def test_mpiexec_mid_epoch_read_failure_stops_every_rank(tmp_path):
    split = tmp_path / "train"
    make_split(split, [40] * 6)
    t0 = time.monotonic()
    # `python -m mpi4py` turns an uncaught exception into MPI_Abort: the documented way to stop all.
    proc = run_mpi(2, [sys.executable, "-m", "mpi4py", str(WORKER), "fail", str(split)], check=False,
                   timeout=120, env=_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    # The read fails, or the per-epoch content check (a ShardReadError subclass) sees the shard first.
    assert ("ShardReadError" in out or "ShardIntegrityError" in out) and "shard-00002.h5" in out, out
    assert "finished the epoch" not in out
    assert time.monotonic() - t0 < 100
