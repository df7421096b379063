"""Model families behind a name -> builder registry.

A family is a function ``builder(cfg, schema) -> nn.Module`` decorated with
``@register_model("name", config=CfgDataclass, task="classification")`` (or a tuple of tasks, the
first being the default: ``mlp`` trains ``("classification", "regression")``, the data's task
deciding, ``schema["task"]``). A user adds a model in
their own module (named in the training config's ``imports:`` list) without touching the trainer.

``schema`` is the data manifest's fields plus the facts a model needs:
``{"fields": {name: {"dtype": str, "shape": [...]}}, "num_classes": C, "num_users": U,
"num_items": I}`` (the last two for ratings), for regression ``"target": {"mean", "std"}`` (the
training targets' statistics: ``hpc.models.regression``). ``forward(batch)`` returns logits ``[B, C]`` for
classification and predictions ``[B]`` for ratings/regression.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Callable

from torch import nn

from hpc.util.typed import from_dict, to_dict

TASKS = ("classification", "ratings", "regression")
_BUILTIN = ("logistic", "linear", "softmax", "mlp", "cnn", "mf")


@dataclasses.dataclass(frozen=True)
class _Entry:
    builder: Callable[[Any, dict], nn.Module]
    config: type
    tasks: tuple[str, ...]    # what it trains; the first is its default


_REGISTRY: dict[str, _Entry] = {}
_loaded = False


def register_model(name: str, *, config: type, task: str | tuple[str, ...] = "classification"):
    """Decorator registering ``builder(cfg, schema)`` under ``name`` with its config dataclass and
    the task(s) it trains (a tuple: the data's task decides, the first is the default)."""
    tasks = (task,) if isinstance(task, str) else tuple(task)
    assert tasks and all(t in TASKS for t in tasks), task
    assert dataclasses.is_dataclass(config), config

    def deco(builder):
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(f"model family {name!r} is already registered")
        _REGISTRY[name] = _Entry(builder, config, tasks)
        return builder

    return deco


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _BUILTIN:
            importlib.import_module(f"hpc.models.{mod}")


def list_models() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _entry(family: str) -> _Entry:
    _load_builtins()
    if family not in _REGISTRY:
        raise ValueError(f"model.family: unknown model family {family!r}; "
                         f"registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[family]


def task_of(family: str, data_task: str | None = None) -> str:
    """The task ``family`` trains on data of ``data_task`` (None: the family's default task).
    ValueError naming the families that do train ``data_task`` when this one does not."""
    tasks = _entry(family).tasks
    if data_task is None:
        return tasks[0]
    if data_task not in tasks:
        fit = [f for f in list_models() if data_task in _REGISTRY[f].tasks]
        raise ValueError(f"model.family={family!r} trains {' or '.join(tasks)}, but the data's task is "
                         f"{data_task}; families for {data_task}: {', '.join(fit) or 'none registered'}")
    return data_task


def model_config(family: str, config: dict | None, where: str = "model.config") -> Any:
    """The family's typed config from a dict (ValueError naming unknown keys / bad values)."""
    return from_dict(_entry(family).config, config or {}, where)


def default_config(family: str) -> dict:
    return to_dict(model_config(family, {}))


def build_model(family: str, config: dict | None, schema: dict) -> nn.Module:
    entry = _entry(family)
    task = task_of(family, schema.get("task"))
    cfg = model_config(family, config)
    model = entry.builder(cfg, schema)
    model.family = family
    model.task = task
    return model


# -- schema helpers shared by the families ------------------------------------------------------

def field_shape(schema: dict, name: str) -> tuple[int, ...]:
    fields = schema.get("fields", {})
    if name not in fields:
        raise ValueError(f"the data has no field {name!r} (fields: {', '.join(sorted(fields))})")
    f = fields[name]
    shape = f.get("shape", ()) if isinstance(f, dict) else getattr(f, "shape", ())
    return tuple(int(s) for s in shape)


def num_features(schema: dict, name: str = "x") -> int:
    return math.prod(field_shape(schema, name)) or 1


def schema_int(schema: dict, key: str) -> int:
    value = schema.get(key)
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"the data schema has no positive {key!r} (got {value!r}); "
                         "is this the right data directory for this model?")
    return value
