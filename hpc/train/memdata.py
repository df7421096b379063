"""In-memory data with world-size-invariant global batches (benchmarks and trainer tests).

Each epoch draws one global permutation from (seed, epoch); global batch ``i`` is
``perm[i*B:(i+1)*B]`` and rank ``r`` takes rows ``[r*b, (r+1)*b)`` of it (``b = B / world``). So
1, 2 or 4 ranks see exactly the same global batches, which is what the "same parameters whatever
the world size" test needs to isolate the gradient sync. It has the reader interface the trainer
uses (``set_epoch``, iteration, ``batches_per_epoch``, ``state_dict``/``load_state_dict``); real
runs use ``hpc.data.StreamingReader``.
"""

from __future__ import annotations

import torch


class MemoryReader:
    def __init__(self, arrays: dict[str, torch.Tensor], rank: int, world_size: int, batch_size: int,
                 seed: int = 0, shuffle: bool = True):
        n = {len(v) for v in arrays.values()}
        assert len(n) == 1, "all fields need the same number of rows"
        self.n = n.pop()
        self.arrays, self.rank, self.world, self.b = arrays, rank, world_size, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.global_b = batch_size * world_size
        self.batches_per_epoch = self.n // self.global_b
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def _perm(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        perm = self._perm()
        while self.position < self.batches_per_epoch:
            start = self.position * self.global_b + self.rank * self.b
            idx = perm[start:start + self.b]
            self.position += 1
            # Unshuffled, a rank's rows are contiguous: views, not a gather (the gather of a 64 x
            # 3x16x16 batch was 1.3 % of `hpc bench train`'s in-memory step, counted as data wait).
            rows = slice(start, start + self.b) if not self.shuffle else idx
            batch = {k: v[rows] for k, v in self.arrays.items()}
            batch["weight"] = torch.ones(self.b)
            batch["row_id"] = idx
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
