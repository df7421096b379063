"""Scoring registered models on raw batches: each model's own normalization, then combination.

A *scorer* has ``prepare(raw_batch)`` (CPU: normalization with the training statistics stored in
the model card, exactly the data layer's ``normalizer`` the trainer's reader applied) and
``forward(prepared)`` (the model, then ``probabilities``: softmax for classification, the
predictions for ratings/regression). Batch inference calls ``prepare`` in its prefetch thread, so
normalization overlaps compute.

- ``Single(model, card)``: one registered model.
- ``Ensemble(members, combiner)``: scorers combined by ``hpc.ensemble.combine.Combiner``
  (mean, vote, weighted, stacking); what ``Registry.load`` returns for an ensemble version and
  what ``hpc infer --model a@production,b@3 --combine mean|vote`` builds.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from hpc.data.normalize import normalizer


def probabilities(task: str, out: torch.Tensor) -> torch.Tensor:
    """A model's raw output -> what batch inference reports (softmax for classification)."""
    return torch.softmax(out.float(), dim=-1) if task == "classification" else out.float().reshape(-1)


def training_stats(card: dict) -> dict:
    """The statistics the model was trained with, as recorded at registration."""
    return (card.get("normalization") or {}).get("stats") or {}


class Single(nn.Module):
    def __init__(self, model: nn.Module, card: dict):
        super().__init__()
        self.model, self.card = model, card
        self.task = card.get("task") or card["schema"].get("task")
        stats = training_stats(card)
        self.stats_key = json.dumps(stats, sort_keys=True)
        self._norm = normalizer(stats, {k: tuple(v["shape"]) for k, v in card["schema"]["fields"].items()})

    def prepare(self, batch: dict[str, torch.Tensor], cache: dict | None = None) -> dict[str, torch.Tensor]:
        if cache is not None and self.stats_key in cache:
            return cache[self.stats_key]
        out = {k: self._norm(k, v) for k, v in batch.items()}
        if cache is not None:
            cache[self.stats_key] = out
        return out

    def forward(self, prepared: dict[str, torch.Tensor]) -> torch.Tensor:
        return probabilities(self.task, self.model(prepared))


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module], combiner: Any, card: dict | None = None):
        super().__init__()
        assert members, "an ensemble needs members"
        self.members = nn.ModuleList(members)
        self.combiner = combiner
        self.card = card
        self.task = combiner.task

    @property
    def cards(self) -> list[dict]:
        return [m.card for m in self.members]

    def prepare(self, batch: dict[str, torch.Tensor], cache: dict | None = None) -> list:
        # Members trained on the same data share statistics: normalize once per distinct set.
        cache = {} if cache is None else cache
        return [m.prepare(batch, cache) for m in self.members]

    def forward(self, prepared: list) -> torch.Tensor:
        # Combine on the CPU: member outputs are small ([B, C] or [B]) and the combiner's weights
        # and meta-model live there, whatever device the members run on.
        return self.combiner([m(p).cpu() for m, p in zip(self.members, prepared)])


def move(prepared: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """A prepared batch (nested lists/dicts of tensors) onto ``device``."""
    if isinstance(prepared, torch.Tensor):
        return prepared.to(device, non_blocking=non_blocking)
    if isinstance(prepared, dict):
        return {k: move(v, device, non_blocking) for k, v in prepared.items()}
    return [move(v, device, non_blocking) for v in prepared]
