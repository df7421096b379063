"""Pure partition arithmetic: which rank gets what, and how many batches every rank yields.

No I/O, no randomness; tested at simulated cluster scale (tests/test_data_partition.py).
"""

from __future__ import annotations

import heapq
from typing import Sequence

REMAINDERS = ("drop", "pad")


def assign_shards(sample_counts: Sequence[int], world_size: int) -> list[list[int]]:
    """Whole shards to ranks, balanced by samples (longest-processing-time greedy).

    Deterministic: biggest shard first (ties by index) to the rank holding the fewest samples (ties
    by rank). Each rank's list is sorted. With fewer shards than ranks some ranks get none; the
    streaming reader therefore splits at block granularity instead (``rank_bounds``), and batch
    inference, which writes one output per shard, uses this.
    """
    if world_size < 1:
        raise ValueError(f"world_size {world_size}: must be >= 1")
    heap = [(0, r) for r in range(world_size)]
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(sample_counts)), key=lambda i: (-int(sample_counts[i]), i)):
        load, r = heapq.heappop(heap)
        out[r].append(i)
        heapq.heappush(heap, (load + int(sample_counts[i]), r))
    return [sorted(s) for s in out]


def rank_bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s half-open range of the epoch's sample stream: sizes differ by at most 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return rank * total // world_size, (rank + 1) * total // world_size


def batches_per_epoch(total: int, world_size: int, batch_size: int, remainder: str) -> int:
    """The same number for every rank, so no rank waits on a collective the others skip.

    ``drop``: full batches only; each rank drops the tail of its range (< batch_size + 1 samples,
    different ones each epoch when shuffling). ``pad``: every sample once; the last batches are
    filled with zero-weight padding samples (``weight == 0``, ``row_id == -1``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder {remainder!r}: valid are {', '.join(REMAINDERS)}")
    if remainder == "drop":
        return (total // world_size) // batch_size
    return -(-(-(-total // world_size)) // batch_size)
