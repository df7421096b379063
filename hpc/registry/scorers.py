"""Loading registered models and scoring them on raw batches: each model's own normalization,
then combination.

``build_model_from_card`` (the family's plain module, weights read verified) and ``build_scorer``
(a ``Single`` or ``Ensemble`` scorer) turn a verified card into something to run; ``Registry.load``
and ``Registry.load_scorer`` (``store.py``) call them after verifying the version.

A *scorer* has ``prepare(raw_batch)`` (CPU: normalization with the training statistics stored in
the model card, exactly the data layer's ``normalizer`` the trainer's reader applied) and
``forward(prepared)`` (the model, then ``probabilities``: softmax for classification, the
predictions for ratings/regression). Batch inference calls ``prepare`` in its prefetch thread, so
normalization overlaps compute.

- ``Single(model, card)``: one registered model.
- ``Ensemble(members, combiner)``: scorers combined by ``hpc.models.combine.Combiner``
  (mean, vote, weighted, stacking); what ``Registry.load`` returns for an ensemble version and
  what ``hpc infer --model a@production,b@3 --combine mean|vote`` builds.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from hpc.data.normalize import normalizer
from hpc.models import build_model, list_models
from hpc.models.combine import Combiner
from hpc.registry.layout import META, WEIGHTS, Ref, read_verified


def probabilities(task: str, out: torch.Tensor) -> torch.Tensor:
    """A model's raw output -> what batch inference reports (softmax for classification)."""
    return torch.softmax(out.float(), dim=-1) if task == "classification" else out.float().reshape(-1)


def _tensor(x: Any) -> Any:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


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
        # numpy arrays (hpc.load(...).predict, a user's batch) become tensors like the reader's.
        out = {k: _tensor(self._norm(k, v)) for k, v in batch.items()}
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


def build_scorer(registry, card: dict, device: str = "cpu") -> nn.Module:
    """A verified card -> ``Single`` or ``Ensemble`` scorer; ``registry`` reads the member cards."""
    if card.get("kind") != "ensemble":
        return Single(build_model_from_card(registry, card, device), card)
    members = []
    for m in card["members"]:
        mcard = registry.card(Ref(m["name"], int(m["version"])))
        if mcard["sha256"] != m["model_json_sha256"]:
            raise ValueError(f"ensemble {card['name']}@{card['version']}: member "
                             f"{m['name']}@{m['version']} model.json changed since registration")
        members.append(build_scorer(registry, mcard, device))
    vdir = registry.version_dir(Ref(card["name"], card["version"]))
    meta_state = load_safetensors(read_verified(vdir, META)) if (card["ensemble"].get("meta")) else None
    return Ensemble(members, Combiner.from_card(card, meta_state), card)  # combines on the CPU


def _load_weights(path: Path, data: bytes) -> dict:
    """safetensors bytes -> state dict; malformed bytes are a ValueError naming the file."""
    try:
        return load_safetensors(data)
    except Exception as e:  # safetensors raises its own SafetensorError (not a ValueError)
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def build_model_from_card(registry, card: dict, device: str = "cpu") -> nn.Module:
    """The plain nn.Module (eval mode) of a verified single-model card."""
    vdir = registry.version_dir(Ref(card["name"], card["version"]))
    state = _load_weights(vdir / WEIGHTS, read_verified(vdir, WEIGHTS))
    # A family registered by a plugin (training config `imports:`, e.g. hpc.ensemble.hierarchical)
    # must be imported before it can be built. Only installed modules are imported (never code from
    # inside the registry or the working directory), unless trusted by name (--trust-plugin).
    if card["model"]["family"] not in list_models():
        for name in (card.get("training_config") or {}).get("imports") or []:
            import_card_plugin(str(name), Path(registry.root), vdir, card["model"]["family"])
    model = build_model(card["model"]["family"], card["model"]["config"], card["schema"])
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not fit (size mismatch ...)
        raise ValueError(f"{vdir / WEIGHTS}: weights do not fit {card['model']['family']}: "
                         f"{str(e).strip()[:500]}") from None
    if missing or unexpected:
        raise ValueError(f"{vdir / WEIGHTS}: weights do not fit {card['model']['family']} "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.to(torch.device(device)).eval()


TRUST_ENV = "HPC_TRUST_PLUGINS"   # comma-separated module names (`--trust-plugin`), inherited by ranks


def trusted_plugins(env=None) -> set[str]:
    return {m.strip() for m in (os.environ if env is None else env).get(TRUST_ENV, "").split(",") if m.strip()}


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def _origins(spec) -> list[Path]:
    out = [Path(spec.origin)] if spec.origin and spec.origin not in ("built-in", "frozen") else []
    return out + [Path(p) for p in (spec.submodule_search_locations or [])]


def import_card_plugin(name: str, registry_root: Path, vdir: Path, family: str) -> None:
    """Import the module a card names (its training config's ``imports:``) if it is an installed
    module: ``hpc.*``, or one found outside the registry and outside the working directory (which
    ``python -m`` puts on sys.path). Anything else only when trusted by name (``--trust-plugin``).
    The top-level package is located without running it; nothing is executed before the check."""
    if not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(f"{vdir}: training config imports {name!r}: not a module name")
    trusted = name in trusted_plugins()
    if not trusted and name.split(".")[0] != "hpc":
        top = name.split(".")[0]
        try:
            spec = sys.modules[top].__spec__ if top in sys.modules else importlib.util.find_spec(top)
        except (ImportError, ValueError) as e:
            raise ValueError(f"{vdir}: model family {family!r} needs module {name!r}, which cannot be found: {e}") from None
        if spec is None:
            raise ValueError(f"{vdir}: model family {family!r} needs module {name!r} (from the training config's "
                             "imports), which is not installed")
        cwd = Path.cwd()
        bad = [o for o in _origins(spec) if _inside(o, registry_root) or o.resolve().parent == cwd.resolve()
               or _inside(o, vdir)]
        if not spec.origin and not spec.submodule_search_locations or bad:
            raise ValueError(f"{vdir}: model family {family!r} needs module {name!r} from {bad[0] if bad else '?'}: "
                             "not an installed module (inside the registry or the working directory); only "
                             "installed modules are imported, or name it with --trust-plugin "
                             f"{name} (${TRUST_ENV}) to run it")
    try:
        importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"{vdir}: model family {family!r} needs module {name!r} "
                         f"(from the training config's imports), which cannot be imported: {e}") from None
