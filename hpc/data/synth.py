"""Synthetic data of any size, generated and written chunk by chunk (constant memory).

- ``tabular``: x ~ N(0, I) in ``features`` dims; y = argmax over classes of a fixed random linear
  map of x plus a quadratic term, plus label noise: learnable, not trivially separable.
- ``images``: C x H x W float32; each class is a small template (bar, cross, ring, ...) pasted at a
  random position with a random colour, plus Gaussian noise. With an integer ``store_dtype``
  (uint8, ...) the pixels are quantized: [-1, 3] maps linearly onto the dtype's range (rounded,
  clipped), so ``--store-dtype uint8`` gives 8-bit images as a camera would. Because the position is random, a
  CNN (translation-equivariant, pooled) learns it well and a linear model on pixels much less.
- ``ratings``: (user, item, rating) with rating = mu + b_u + b_i + <U_u, V_i> + noise(std=``noise``):
  low-rank truth; the recommender's best achievable RMSE is the stated noise level.

Chunk k is generated from SeedSequence([seed, k]), so the data set depends only on (seed, kind,
parameters, chunk size), never on memory. Memory is one chunk (default 4096 samples).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from hpc.data.manifest import FieldSpec, Manifest
from hpc.data.sources import write_splits
from hpc.data.writer import WriterConfig
from hpc.util.progress import Progress

KINDS = ("tabular", "images", "ratings")


@dataclass(frozen=True)
class SynthConfig:
    kind: str
    samples: int
    seed: int = 0
    classes: int = 10
    features: int = 32           # tabular
    channels: int = 3            # images
    size: int = 32               # images: H = W
    noise: float = 0.5           # images: pixel noise std; ratings: rating noise std; tabular: label noise
    users: int = 1000            # ratings
    items: int = 500             # ratings
    rank: int = 8                # ratings: rank of the true preference matrix
    chunk: int = 4096

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--kind {self.kind!r}: valid are {', '.join(KINDS)}")
        for name in ("samples", "classes", "features", "channels", "size", "users", "items", "rank", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be >= 1")
        if self.kind == "images" and self.size < 8:
            raise ValueError(f"--size {self.size}: images need size >= 8")
        if self.noise < 0:
            raise ValueError(f"--noise {self.noise}: must be >= 0")

    @property
    def task(self) -> str:
        return "ratings" if self.kind == "ratings" else "classification"

    def fields(self) -> dict[str, FieldSpec]:
        if self.kind == "ratings":
            return {"user": FieldSpec("int64", ()), "item": FieldSpec("int64", ()),
                    "rating": FieldSpec("float32", ())}
        shape = (self.features,) if self.kind == "tabular" else (self.channels, self.size, self.size)
        return {"x": FieldSpec("float32", shape), "y": FieldSpec("int64", ())}


def _truth(cfg: SynthConfig) -> dict[str, np.ndarray]:
    """Parameters shared by all chunks (small: a few KB to a few MB)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x7275]))
    if cfg.kind == "tabular":
        return {"w": rng.normal(size=(cfg.features, cfg.classes)),
                "q": rng.normal(size=(cfg.features, cfg.classes)) / np.sqrt(cfg.features)}
    if cfg.kind == "images":
        return {"templates": _templates(cfg.classes, max(4, cfg.size // 4), rng),
                "colors": rng.uniform(0.5, 1.5, size=(cfg.classes, cfg.channels))}
    k = cfg.rank
    return {"U": rng.normal(size=(cfg.users, k)) / np.sqrt(k), "V": rng.normal(size=(cfg.items, k)),
            "bu": rng.normal(scale=0.3, size=cfg.users), "bi": rng.normal(scale=0.3, size=cfg.items),
            "user_pop": rng.dirichlet(np.full(cfg.users, 2.0)),
            "item_pop": rng.dirichlet(np.full(cfg.items, 0.5))}


def _templates(classes: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``classes`` distinct k x k binary shapes: bars, crosses, rings, diagonals, then random blobs."""
    yy, xx = np.mgrid[0:k, 0:k]
    c = (k - 1) / 2
    r = np.hypot(yy - c, xx - c)
    base = [np.abs(yy - c) < 1, np.abs(xx - c) < 1, (np.abs(yy - c) < 1) | (np.abs(xx - c) < 1),
            np.abs(yy - xx) < 1, np.abs(yy + xx - (k - 1)) < 1, (r > c - 1.2) & (r < c + 0.2),
            r < c / 2 + 0.5, (yy < c) & (xx < c), (yy + xx) % 2 == 0, (yy < c) ^ (xx < c)]
    out = [b.astype(np.float32) for b in base[:classes]]
    while len(out) < classes:
        out.append((rng.random((k, k)) < 0.4).astype(np.float32))
    return np.stack(out)


def _chunk(cfg: SynthConfig, truth: dict, index: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index]))
    if cfg.kind == "tabular":
        x = rng.normal(size=(n, cfg.features))
        score = x @ truth["w"] + (x ** 2) @ truth["q"] + rng.normal(scale=cfg.noise, size=(n, cfg.classes))
        return {"x": x.astype(np.float32), "y": score.argmax(1).astype(np.int64)}
    if cfg.kind == "images":
        tpl, k, s = truth["templates"], truth["templates"].shape[-1], cfg.size
        y = rng.integers(0, cfg.classes, n)
        oy, ox = rng.integers(0, s - k + 1, n), rng.integers(0, s - k + 1, n)
        canvas = np.zeros((n, s, s), np.float32)
        ar = np.arange(k)
        canvas[np.arange(n)[:, None, None], oy[:, None, None] + ar[None, :, None],
               ox[:, None, None] + ar[None, None, :]] = tpl[y]
        color = truth["colors"][y] * rng.uniform(0.7, 1.3, size=(n, 1))
        x = canvas[:, None, :, :] * color[:, :, None, None].astype(np.float32)
        noise = rng.standard_normal(size=x.shape, dtype=np.float32)
        noise *= np.float32(cfg.noise)
        x += noise
        return {"x": x, "y": y.astype(np.int64)}
    u = rng.choice(cfg.users, size=n, p=truth["user_pop"])
    i = rng.choice(cfg.items, size=n, p=truth["item_pop"])
    r = 3.5 + truth["bu"][u] + truth["bi"][i] + np.einsum("nk,nk->n", truth["U"][u], truth["V"][i])
    r += rng.normal(scale=cfg.noise, size=n)
    return {"user": u.astype(np.int64), "item": i.astype(np.int64), "rating": r.astype(np.float32)}


INT_STORE = ("uint8", "int8", "uint16", "int16")
PIXEL_RANGE = (-1.0, 3.0)  # image values mapped onto an integer store dtype's range


def quantize(x: np.ndarray, dtype: str) -> np.ndarray:
    """Image values -> integers of ``dtype``: PIXEL_RANGE linearly onto its range, rounded, clipped."""
    info = np.iinfo(dtype)
    lo, hi = PIXEL_RANGE
    q = np.rint(info.min + (x.astype(np.float64) - lo) * ((int(info.max) - int(info.min)) / (hi - lo)))
    return np.clip(q, info.min, info.max).astype(dtype)


def synth_chunks(cfg: SynthConfig, store_dtype: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """``store_dtype``: an integer dtype quantizes images (``quantize``); tabular features are
    real-valued and refuse one."""
    if store_dtype in INT_STORE and cfg.kind != "images":
        raise ValueError(f"--store-dtype {store_dtype}: {cfg.kind} features are real-valued, not integers; "
                         "use --store-dtype float16 or bfloat16 (or images for 8/16-bit pixels)")
    truth = _truth(cfg)
    for index, start in enumerate(range(0, cfg.samples, cfg.chunk)):
        chunk = _chunk(cfg, truth, index, min(cfg.chunk, cfg.samples - start))
        if store_dtype in INT_STORE:
            chunk["x"] = quantize(chunk["x"], store_dtype)
        yield chunk


def synth(cfg: SynthConfig, out: str | os.PathLike, *, split: str = "train=0.8,val=0.1,test=0.1", writer: WriterConfig = WriterConfig(),
          progress: bool = False) -> dict[str, Manifest]:
    """``progress``: rows written so far on stderr (``hpc.util.progress``)."""
    counts = ({"num_users": cfg.users, "num_items": cfg.items} if cfg.kind == "ratings"
              else {"num_classes": cfg.classes})
    extra = {"synth": {k: v for k, v in cfg.__dict__.items()}}
    if cfg.kind == "ratings":
        extra["synth"]["noise_floor_rmse"] = cfg.noise
    if writer.store_dtype in INT_STORE:
        extra["synth"]["quantized"] = {"dtype": writer.store_dtype, "from": list(PIXEL_RANGE)}
    return write_splits(synth_chunks(cfg, writer.store_dtype), out, cfg.task, cfg.fields(), split, cfg.seed, writer,
                        source=f"synth:{cfg.kind}", extra=extra,
                        progress=Progress(cfg.samples, label="synth", enabled=progress), **counts)
