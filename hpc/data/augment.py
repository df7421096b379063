"""Batch augmentation (vectorized over the whole batch), seeded from (seed, epoch, rank, step).

Images ``x [B, C, H, W]``: random horizontal flips, random crops after zero padding, small
rotations (one affine grid_sample for the batch), Gaussian noise. Tabular ``x [B, F]``: feature
noise. The generator for batch ``step`` is derived from (seed, epoch, rank, step) alone, so a
reader resumed at any batch reproduces exactly the augmentation an uninterrupted run applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F


def batch_generator(seed: int, epoch: int, rank: int, step: int) -> torch.Generator:
    key = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank, step, 0x4155]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(key[0] >> np.uint64(1)))


@dataclass(frozen=True)
class Augment:
    flip: bool = False          # horizontal flip with probability 1/2 (images)
    crop_pad: int = 0           # zero-pad by this many pixels, then crop back at a random offset
    rotate_deg: float = 0.0     # rotate by a uniform angle in [-rotate_deg, rotate_deg] (images)
    noise_std: float = 0.0      # add N(0, noise_std^2) to x (images and tabular)

    def __post_init__(self) -> None:
        if self.crop_pad < 0 or self.noise_std < 0 or not 0 <= self.rotate_deg <= 45:
            raise ValueError(f"augment {self}: crop_pad >= 0, noise_std >= 0 and 0 <= rotate_deg <= 45")

    @property
    def spatial(self) -> bool:
        return self.flip or self.crop_pad > 0 or self.rotate_deg > 0

    @classmethod
    def parse(cls, spec: Any) -> "Augment | Callable | None":
        """None | Augment | callable(batch, generator) | dict of fields | "flip,crop=4,rotate=10,noise=0.05"."""
        if spec is None or isinstance(spec, cls) or callable(spec):
            return spec
        if isinstance(spec, str):
            names = {"flip": "flip", "crop": "crop_pad", "rotate": "rotate_deg", "noise": "noise_std"}
            out: dict[str, Any] = {}
            for part in filter(None, (p.strip() for p in spec.split(","))):
                key, eq, val = part.partition("=")
                if key not in names:
                    raise ValueError(f"augment {spec!r}: unknown {key!r}; valid are flip, crop=PX, "
                                     "rotate=DEG, noise=STD")
                out[names[key]] = True if not eq else float(val) if key != "crop" else int(val)
            spec = out
        if isinstance(spec, dict):
            valid = {f.name for f in fields(cls)}
            bad = set(spec) - valid
            if bad:
                raise ValueError(f"augment: unknown option(s) {sorted(bad)}; valid are {sorted(valid)}")
            return cls(**spec)
        raise ValueError(f"augment {spec!r}: pass a dict, an Augment, a callable or a string")

    def check(self, x_shape: tuple[int, ...]) -> None:
        if self.spatial and len(x_shape) != 3:
            raise ValueError(f"augment flip/crop/rotate need image samples [C, H, W]; x has per-sample "
                             f"shape {list(x_shape)} (use noise for tabular data)")

    def __call__(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch["x"]
        b = x.shape[0]
        if self.flip:
            mask = torch.rand(b, generator=gen) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        if self.crop_pad:
            p = self.crop_pad
            h, w = x.shape[-2:]
            padded = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
            rows = (oy[:, None] + torch.arange(h))[:, :, None]
            cols = (ox[:, None] + torch.arange(w))[:, None, :]
            x = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()
        if self.rotate_deg:
            ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(self.rotate_deg)
            cos, sin = torch.cos(ang), torch.sin(ang)
            zero = torch.zeros_like(cos)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.noise_std:
            x = x + torch.randn(x.shape, generator=gen) * self.noise_std
        out = dict(batch)
        out["x"] = x
        return out
