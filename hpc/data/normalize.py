"""Preprocessing statistics: one streaming pass in float64, applied on the fly by readers.

Statistics are per feature for 1-D samples and per channel (axis 0 of the sample) for images, so
flips and crops keep them valid. Blocks are merged with Chan et al.'s pairwise update (mean and
sum of squared deviations, in float64 whatever the stored dtype: uint8 images and their float32
copy get the same statistics), which stays accurate where sum/sum-of-squares in float32 would not.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from hpc.data.manifest import INPUT_FIELDS


BLOCK_VALUES = 1 << 21  # values per float64 block of a statistics update (16 MB)


def _per(shape: tuple[int, ...]) -> str:
    return "channel" if len(shape) >= 2 else "feature"


class RunningStats:
    """Mean/std of one field over a stream of batches ``[n, *shape]`` (float64 accumulators)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.per = _per(self.shape)
        width = 1 if not self.shape else self.shape[0]
        self.count = 0
        self.mean = np.zeros(width, np.float64)
        self.m2 = np.zeros(width, np.float64)

    def update(self, batch: np.ndarray) -> None:
        """Add rows of any stored numeric dtype (uint8 ... float64). Deviations are taken in float64
        over blocks of about ``BLOCK_VALUES`` values (bounded memory), so the statistics are exact to
        float64 rounding whatever the stored dtype, and the same values stored as uint8 or float32
        give bit-identical statistics."""
        b = np.asarray(batch)
        if b.shape[0] == 0:
            return
        width = 1 if not self.shape else self.shape[0]
        # View as [rows, width, inner]; reduce over rows and inner.
        channels = self.per == "channel" or not self.shape
        x = b.reshape(b.shape[0], width, -1) if channels else b.reshape(b.shape[0], -1, 1)
        step = max(1, BLOCK_VALUES // max(1, x.shape[1] * x.shape[2]))
        for a in range(0, x.shape[0], step):
            self._merge(x[a:a + step].astype(np.float64))

    def _merge(self, x: np.ndarray) -> None:
        """Chan et al.'s pairwise update with one block ``[rows, width, inner]`` (float64)."""
        n = x.shape[0] * x.shape[2]
        mean = x.sum(axis=(0, 2)) / n
        x -= mean[None, :, None]
        m2 = np.einsum("rwi,rwi->w", x, x)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def result(self) -> dict:
        std = np.sqrt(self.m2 / max(self.count, 1))
        return {"mean": self.mean.tolist(), "std": std.tolist(), "count": int(self.count), "per": self.per}


def _broadcast(values, shape: tuple[int, ...], per: str) -> np.ndarray:
    v = np.asarray(values, np.float32)
    if per == "channel" and len(shape) >= 2:
        return v.reshape((len(v),) + (1,) * (len(shape) - 1))
    return v.reshape(shape) if shape else v.reshape(())


def normalizer(stats: Mapping[str, dict], fields: Mapping[str, tuple[int, ...]]):
    """Return ``f(field, x, inplace=False, out=None) -> x'`` applying ``(x - mean) / std`` (float32)
    for the fields in ``stats`` (others pass through). ``x`` is a numpy array or a torch tensor.

    The arithmetic runs in numpy: torch's intra-op threads make these two ops ~10x slower on a busy
    2-core node. ``inplace=True`` (numpy float32 only; readers pass batches they own) saves a copy.
    ``out`` (numpy float32, x's shape): the result goes there; a compactly stored ``x`` (uint8,
    int16, float16, ...) is converted and centred in the same pass, with the same float32 result as
    normalizing ``x.astype(float32)`` (a field without stats is just converted into ``out``).
    A std of 0 (a constant feature) divides by 1 instead, so the feature becomes 0, not NaN.
    """
    table = {}
    for name, st in stats.items():
        if name not in fields:
            continue
        shape = tuple(fields[name])
        per = st.get("per", _per(shape))
        try:
            mean = _broadcast(st["mean"], shape, per)
            std = _broadcast(st["std"], shape, per)
        except (KeyError, ValueError) as e:
            raise ValueError(f"normalize stats for field {name!r} ({per}, {len(st.get('mean', []))} "
                             f"values) do not fit its per-sample shape {list(shape)}: {e}") from None
        std = np.where(std > 0, std, 1.0).astype(np.float32)
        table[name] = (mean, (1.0 / std).astype(np.float32))

    def apply(name: str, x, inplace: bool = False, out: np.ndarray | None = None):
        if name not in table:
            if out is not None:
                np.copyto(out, x, casting="unsafe")
                return out
            return x
        mean, inv = table[name]
        if not isinstance(x, np.ndarray):  # a torch tensor
            import torch

            if x.device.type != "cpu":
                return (x.float() - torch.as_tensor(mean, device=x.device)) * torch.as_tensor(inv, device=x.device)
            return torch.from_numpy(apply(name, x.detach().numpy().astype(np.float32), inplace=True))
        if out is None:
            out = x if inplace and x.dtype == np.float32 else x.astype(np.float32)
            np.subtract(out, mean, out=out)
        else:  # one pass: each stored value is widened to float32 exactly, then centred
            np.subtract(x, mean, out=out, dtype=np.float32)
        np.multiply(out, inv, out=out)
        return out

    return apply


def input_stats(schema: dict, stats: dict) -> dict:
    """The statistics that normalization applies: those of the task's float input fields.

    ``schema`` is ``Manifest.schema()`` (or a model card's copy of it), ``stats`` the manifest's
    per-field statistics. The reader (``normalize=True``), the trainer's val/test readers (which
    use the *training* split's statistics) and the registry (which records them) all call this.
    """
    fields = schema.get("fields", {})
    return {k: v for k, v in stats.items() if k in INPUT_FIELDS.get(schema.get("task"), ())
            and k in fields and np.dtype(fields[k]["dtype"]).kind == "f"}
