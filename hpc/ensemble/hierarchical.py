"""Hierarchical models: a registered model's intermediate features as another model's input.

Model family ``hierarchical`` (classification), enabled with ``imports: [hpc.ensemble.hierarchical]``
in the training config::

    model:
      family: hierarchical
      config:
        features_from: digits-cnn@3:features   # NAME@VERSION|ALIAS:LAYER (a module name of that model)
        freeze: true                           # false: fine-tune the extractor with the head
        head: {family: mlp, config: {widths: [64]}}
        registry: null                         # default: $HPC_REGISTRY or ./registry

At build time the extractor is loaded from the registry (checksums verified) and the output of
its module LAYER, flattened, becomes field ``x`` of the head's input. A forward hook on LAYER
stops the extractor there (nothing after LAYER is computed). A frozen extractor has no gradients
and stays in eval mode (BatchNorm statistics fixed) while the head trains. The saved weights
hold extractor and head, so a fine-tuned extractor is restored exactly; rebuilding the skeleton
(at registry load) reads the extractor's registry entry again.

The extractor sees the batch as this run's reader normalized it: train on the data (statistics)
the extractor was trained on, or on data with the same statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from hpc.models.families import build_model, register_model, task_of
from hpc.registry import Registry
from hpc.util.typed import require


@dataclass
class HierarchicalConfig:
    features_from: str = ""
    freeze: bool = True
    head: dict = field(default_factory=lambda: {"family": "softmax", "config": {}})
    registry: str | None = None

    def check(self, where: str) -> None:
        ref, sep, layer = self.features_from.rpartition(":")
        require(bool(sep and ref and layer and "@" in ref), f"{where}.features_from",
                f"must be NAME@VERSION:LAYER (e.g. digits-cnn@1:features), got {self.features_from!r}")
        require(isinstance(self.head, dict) and bool(self.head.get("family")), f"{where}.head",
                "must be a mapping with family (and optional config), e.g. {family: softmax}")
        unknown = set(self.head) - {"family", "config"}
        require(not unknown, f"{where}.head", f"unknown keys {sorted(unknown)}; valid: family, config")
        require(task_of(self.head["family"]) == "classification", f"{where}.head.family",
                f"{self.head['family']!r} is not a classification family")

    @property
    def ref(self) -> str:
        return self.features_from.rpartition(":")[0]

    @property
    def layer(self) -> str:
        return self.features_from.rpartition(":")[2]


class _Stop(Exception):
    def __init__(self, out: torch.Tensor):
        self.out = out


class Hierarchical(nn.Module):
    def __init__(self, extractor: nn.Module, layer: str, head: nn.Module, freeze: bool):
        super().__init__()
        self.extractor, self.layer, self.head, self.freeze = extractor, layer, head, freeze
        modules = dict(extractor.named_modules())
        if layer not in modules or layer == "":
            names = [n for n in modules if n]
            raise ValueError(f"model.config.features_from: the extractor has no module {layer!r}; "
                             f"its modules are {', '.join(names[:40])}")
        modules[layer].register_forward_hook(self._stop)
        if freeze:
            for p in extractor.parameters():
                p.requires_grad_(False)

    @staticmethod
    def _stop(module, inputs, output):
        raise _Stop(output)

    def features(self, batch: dict) -> torch.Tensor:
        try:
            self.extractor(batch)
        except _Stop as s:
            return s.out.flatten(1).float()
        raise AssertionError("the extractor's forward did not reach the hooked layer")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.extractor.eval()
        return self

    def forward(self, batch: dict) -> torch.Tensor:
        if self.freeze:
            with torch.no_grad():
                x = self.features(batch)
        else:
            x = self.features(batch)
        return self.head(dict(batch, x=x))


@register_model("hierarchical", config=HierarchicalConfig, task="classification")
def build(cfg: HierarchicalConfig, schema: dict) -> nn.Module:
    reg = Registry(cfg.registry)
    extractor, card = reg.load(cfg.ref, allow_unpromoted=True)
    if card.get("kind") == "ensemble":
        raise ValueError(f"model.config.features_from: {cfg.ref} is an ensemble; name a single model")
    mine, theirs = schema.get("fields", {}), card["schema"]["fields"]
    for name, spec in theirs.items():
        if name in mine and list(mine[name]["shape"]) != list(spec["shape"]):
            raise ValueError(f"model.config.features_from: {cfg.ref} takes {name} of shape {spec['shape']}, "
                             f"this data has {mine[name]['shape']}")
    extractor = extractor.cpu()
    model = Hierarchical(extractor, cfg.layer, nn.Identity(), cfg.freeze)
    probe = {k: torch.zeros((2, *v["shape"]), dtype=torch.float32 if "float" in v["dtype"] else torch.int64)
             for k, v in theirs.items()}
    was = extractor.training
    extractor.eval()
    with torch.no_grad():
        width = math.prod(model.features(probe).shape[1:])
    extractor.train(was)
    head_schema = dict(schema, fields=dict(mine, x={"dtype": "float32", "shape": [int(width)]}))
    model.head = build_model(cfg.head["family"], cfg.head.get("config") or {}, head_schema)
    return model
