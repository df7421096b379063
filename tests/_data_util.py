"""Shared helpers for the data-layer tests, and the per-rank worker the mpiexec tests start.

``make_split`` writes a classification split whose ``x`` encodes the global row id (x[i, 0] == i),
so a test can check that what a reader yields for ``row_id`` is really that row.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from hpc.data.manifest import FieldSpec
from hpc.data.writer import ShardWriter, WriterConfig


def make_split(split_dir, counts, features: int = 3, classes: int = 4, compression: str = "none",
               image: bool = False):
    """A split with shards of the given sizes (in order); x[i, 0] (or x[i, 0, 0, 0]) == row id."""
    shape = (1, 4, 4) if image else (features,)
    fields = {"x": FieldSpec("float32", shape), "y": FieldSpec("int64", ())}
    w = ShardWriter(split_dir, "classification", fields, WriterConfig(samples_per_shard=max(counts),
                                                                      compression=compression),
                    num_classes=classes)
    rng = np.random.default_rng(len(counts))
    start = 0
    for n in counts:
        if n == 0:  # the writer never publishes an empty shard
            continue
        ids = np.arange(start, start + n)
        x = rng.normal(size=(n,) + shape).astype(np.float32)
        x.reshape(n, -1)[:, 0] = ids
        w.add({"x": x, "y": ids % classes})
        w.end_shard()  # one shard per entry of counts
        start += n
    return w.close({"source": "test"})


def collect(reader, epochs=(None,)):
    """All batches of one pass as numpy dicts."""
    return [{k: v.numpy().copy() for k, v in b.items()} for b in reader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def mpi_worker(split_dir: str, out_dir: str, batch_size: int, epochs: int) -> None:
    """Run under mpiexec: each rank reads its part of every epoch and saves what it saw."""
    from mpi4py import MPI

    from hpc.data import StreamingReader
    from hpc.dist.world import world_from_env

    world = world_from_env()
    comm = MPI.COMM_WORLD
    assert comm.Get_rank() == world.rank and comm.Get_size() == world.size
    r = StreamingReader(split_dir, world.rank, world.size, batch_size, seed=7, remainder="pad",
                        normalize=False)
    for epoch in range(epochs):
        r.set_epoch(epoch)
        ids, xs, n = [], [], 0
        for batch in r:
            keep = batch["weight"].numpy() > 0
            ids.append(batch["row_id"].numpy()[keep])
            xs.append(batch["x"].numpy()[keep].reshape(int(keep.sum()), -1)[:, 0])
            n += 1
            comm.allreduce(n)  # a collective per batch: hangs if ranks disagree on the count
        counts = comm.allgather(n)
        assert len(set(counts)) == 1, counts
        np.savez(Path(out_dir) / f"rank{world.rank}-epoch{epoch}.npz", ids=np.concatenate(ids),
                 x=np.concatenate(xs), batches=n)


def fail_worker(split_dir: str) -> None:
    """Under mpiexec: rank 0 damages a shard it has not opened yet, then every rank keeps reading
    with a collective per batch. Rank 0's ShardReadError must end the whole job, not hang it."""
    import os

    from mpi4py import MPI

    from hpc.data import StreamingReader

    comm = MPI.COMM_WORLD
    r = StreamingReader(split_dir, comm.Get_rank(), comm.Get_size(), 8, shuffle=False, prefetch=0,
                        shuffle_buffer_mb=1e-6, normalize=False)
    for i, _batch in enumerate(r):
        if i == 0 and comm.Get_rank() == 0:
            p = Path(split_dir) / "shard-00002.h5"
            p.write_bytes(b"\0" * os.path.getsize(p))
        comm.allreduce(i)
    print(f"rank {comm.Get_rank()} finished the epoch", flush=True)


def record_verifiers(monkeypatch) -> list:
    """Collect the ShardVerifiers the readers create (which shards each hashed / took from the cache)."""
    import hpc.data.reader as reader_mod

    made = []

    class Recording(reader_mod.ShardVerifier):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(reader_mod, "ShardVerifier", Recording)
    return made


if __name__ == "__main__":
    if sys.argv[1] == "fail":
        fail_worker(sys.argv[2])
    else:
        mpi_worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
