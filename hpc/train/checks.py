"""Checks of a config against where it runs (the number of ranks, a GPU), each written once.

Called before any rank starts work (``runner.preflight``, also in ``hpc train --nproc``'s parent)
and again where the value is used (``Trainer``, ``load_data``): a run with injected data skips
preflight.
"""

from __future__ import annotations


def check_precision(precision: str, cuda: bool) -> None:
    """fp16 needs CUDA (its grad scaler is CUDA's); bf16 and fp32 run anywhere."""
    if precision == "fp16" and not cuda:
        raise ValueError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """The share of the global ``data.batch_size`` each rank reads; it must split evenly."""
    if batch_size % world_size:
        raise ValueError(f"data.batch_size={batch_size} (the global batch) is not divisible by the "
                         f"{world_size} ranks; choose a multiple of {world_size}")
    return batch_size // world_size
