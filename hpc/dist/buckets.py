"""Assign gradient tensors to fusion buckets (a pure function; GradSync packs and reduces them).

Why buckets: one allreduce per tensor pays the per-message latency hundreds of times (a 200-tensor
model), one allreduce of everything cannot start before the whole backward pass is done. Buckets of
a few tens of MB are large enough to run at full bandwidth and small enough to start early; at most
32 MB, because Open MPI's all-reduce allocates a message-sized scratch buffer and glibc maps a fresh
one for every malloc over 32 MB: a 64 MB message cost twice as much per byte (docs/dist.md).
"""

from __future__ import annotations

from typing import Hashable, Sequence


def assign_buckets(sizes: Sequence[int], bucket_bytes: int,
                   keys: Sequence[Hashable] | None = None) -> list[list[int]]:
    """Group tensor indices into buckets of at most ``bucket_bytes`` each.

    ``sizes[i]`` is tensor i's size in bytes, in registration order (``model.parameters()``).
    Tensors are taken in *reverse* registration order, the order backward produces their gradients,
    and appended greedily to the open bucket of their ``keys[i]`` (dtype/device: a bucket is one
    flat buffer, so it holds one kind); a bucket is closed when the next tensor would overflow it,
    and a tensor larger than ``bucket_bytes`` gets a bucket of its own.

    Returns the buckets in the order they fill up (the order of their last tensor), each a list of
    indices in reverse registration order. The result depends only on the arguments, so every rank
    computes the same buckets and issues the same collectives in the same order.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size {bucket_bytes!r} bytes: must be positive")
    if keys is not None and len(keys) != len(sizes):
        raise ValueError(f"{len(keys)} keys for {len(sizes)} tensors")
    open_: dict[Hashable, list[int]] = {}  # key -> [indices...] of its open bucket
    filled: dict[Hashable, int] = {}
    last: dict[Hashable, int] = {}  # key -> position (in reverse order) of the open bucket's last tensor
    closed: list[tuple[int, list[int]]] = []  # (position of the bucket's last tensor, bucket)
    for pos, i in enumerate(range(len(sizes) - 1, -1, -1)):
        size = int(sizes[i])
        if size < 0:
            raise ValueError(f"tensor {i} has negative size {size}")
        key = None if keys is None else keys[i]
        bucket = open_.get(key)
        if bucket and filled[key] + size > bucket_bytes:
            closed.append((last[key], bucket))
            bucket = None
        if bucket is None:
            bucket = open_[key] = []
            filled[key] = 0
        bucket.append(i)
        filled[key] += size
        last[key] = pos
    closed += [(last[key], bucket) for key, bucket in open_.items()]
    closed.sort(key=lambda pb: pb[0])
    return [b for _, b in closed]
