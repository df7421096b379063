"""Pure epoch plans: the exact order in which a rank reads its samples in an epoch.

1. Every shard is cut into blocks of ``block_rows`` contiguous rows (= the HDF5 chunk, ~1 MB), the
   unit of I/O: readers only ever read whole chunks or contiguous slices.
2. The epoch stream: shards in an order drawn from (seed, epoch), each shard's blocks in an order
   drawn from (seed, epoch). Rank r takes the contiguous piece ``rank_bounds(N, w, r)`` of it
   (balanced to one sample; a rank touches about N/w/shard_size + 2 shards, so it keeps file
   locality, and a block on a boundary is split between two ranks).
3. The rank permutes its blocks (seed, epoch, rank) and groups them into windows of about
   ``window_samples`` samples (the bounded shuffle buffer); each window's samples are permuted
   (seed, epoch, rank, window).

Everything is a function of (sample_counts, block_rows, world_size, rank, seed, epoch, window),
computed with numpy in O(number of blocks): exact resume only needs (epoch, batch index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hpc.data.partition import rank_bounds

_TAG_STREAM, _TAG_RANK, _TAG_WINDOW = 0x5354, 0x524B, 0x574E


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


def shard_blocks(sample_counts: Sequence[int], block_rows: int) -> np.ndarray:
    """All blocks as an int64 array ``[k, 3]`` of (shard, start, stop), in manifest order."""
    if block_rows < 1:
        raise ValueError(f"block_rows {block_rows}: must be >= 1")
    counts = np.asarray(sample_counts, np.int64)
    nb = -(-counts // block_rows)
    shard = np.repeat(np.arange(len(counts)), nb)
    first = np.cumsum(nb) - nb
    j = np.arange(int(nb.sum())) - np.repeat(first, nb)
    start = j * block_rows
    stop = np.minimum(start + block_rows, counts[shard])
    return np.stack([shard, start, stop], axis=1)


def epoch_stream(sample_counts: Sequence[int], block_rows: int, seed: int, epoch: int,
                 shuffle: bool = True) -> np.ndarray:
    """Blocks in this epoch's global order (shard order and block order within shards drawn)."""
    blocks = shard_blocks(sample_counts, block_rows)
    if not shuffle or len(blocks) == 0:
        return blocks
    rng = _rng(seed, epoch, _TAG_STREAM)
    shard_pos = rng.permutation(len(sample_counts))
    key = rng.random(len(blocks))
    return blocks[np.lexsort((key, shard_pos[blocks[:, 0]]))]


def cut(segments: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The sub-stream covering stream positions [lo, hi) of ``segments`` (splitting end blocks)."""
    lens = segments[:, 2] - segments[:, 1]
    ends = np.cumsum(lens)
    starts = ends - lens
    keep = (ends > lo) & (starts < hi)
    seg, s0, e0 = segments[keep].copy(), starts[keep], ends[keep]
    if len(seg):
        seg[0, 1] += max(0, lo - int(s0[0]))
        seg[-1, 2] -= max(0, int(e0[-1]) - hi)
    return seg


@dataclass(frozen=True)
class RankPlan:
    """One rank's epoch: windows of segments; window w covers rank positions [starts[w], starts[w+1])."""
    segments: np.ndarray       # [k, 3] (shard, start, stop), in read order
    window_of: np.ndarray      # [k] window index of each segment
    starts: np.ndarray         # [n_windows + 1] rank-stream position where each window starts
    seed: int
    epoch: int
    rank: int
    shuffle: bool

    @property
    def samples(self) -> int:
        return int(self.starts[-1])

    def window_segments(self, w: int) -> np.ndarray:
        return self.segments[self.window_of == w]

    def window_perm(self, w: int) -> np.ndarray:
        n = int(self.starts[w + 1] - self.starts[w])
        if not self.shuffle:
            return np.arange(n)
        return _rng(self.seed, self.epoch, self.rank, w, _TAG_WINDOW).permutation(n)

    def window_at(self, position: int) -> int:
        return int(np.searchsorted(self.starts, position, side="right") - 1)


def rank_plan(sample_counts: Sequence[int], block_rows: int, world_size: int, rank: int, seed: int,
              epoch: int, window_samples: int, shuffle: bool = True) -> RankPlan:
    total = int(np.sum(np.asarray(sample_counts, np.int64)))
    lo, hi = rank_bounds(total, world_size, rank)
    seg = cut(epoch_stream(sample_counts, block_rows, seed, epoch, shuffle), lo, hi)
    if shuffle and len(seg):
        seg = seg[_rng(seed, epoch, rank, _TAG_RANK).permutation(len(seg))]
    lens = seg[:, 2] - seg[:, 1]
    pos = np.cumsum(lens) - lens
    window_of = pos // max(1, window_samples)
    # Renumber windows 0..W-1 (a block longer than the window leaves gaps otherwise).
    uniq, window_of = np.unique(window_of, return_inverse=True)
    starts = np.zeros(len(uniq) + 1, np.int64)
    np.add.at(starts, window_of + 1, lens)
    return RankPlan(seg, window_of.astype(np.int64), np.cumsum(starts), seed, epoch, rank, shuffle)


def rank_order(sample_counts: Sequence[int], block_rows: int, world_size: int, rank: int, seed: int,
               epoch: int, window_samples: int, shuffle: bool = True) -> np.ndarray:
    """Global row ids (manifest order) in the order rank ``rank`` yields them (for tests/tools)."""
    plan = rank_plan(sample_counts, block_rows, world_size, rank, seed, epoch, window_samples, shuffle)
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sample_counts, np.int64))])
    parts = []
    for w in range(len(plan.starts) - 1):
        seg = plan.window_segments(w)
        ids = np.concatenate([np.arange(offsets[s] + a, offsets[s] + b) for s, a, b in seg])
        parts.append(ids[plan.window_perm(w)])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
