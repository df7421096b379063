"""Model cards: what ``model.json`` holds, built from a run directory or from member cards. Pure
but for reading the run directory; building a model or scorer from a card is ``scorers.py``.

The card is everything needed to rebuild and trust a model without its run directory: family and
config (to call ``hpc.models.build_model``), the input schema and normalization statistics of the
training data (checked and applied by batch inference), metrics, the resolved training config and
lineage (run directory, data manifest sha256, code and package versions, Slurm job).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

from hpc.data.normalize import input_stats
from hpc.models.combine import METHODS
from hpc.registry.layout import CARD_FORMAT, WEIGHTS
from hpc.util.io import read_json

_REQUIRED = (("model", "family"), ("model", "config"), ("data", "schema"))


def _get(d: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


UNFINISHED = ("preempted", "failed")


def unfinished(run_dir: Path) -> str | None:
    """Why ``run_dir`` is not a finished run (its summary's state), or None: a preempted or failed
    run's models are those of an interrupted training, not what the config asked for."""
    try:
        state = read_json(Path(run_dir) / "summary.json").get("state")
    except (ValueError, AttributeError):
        return None  # card_from_run names what is wrong with the directory
    if state in UNFINISHED:
        return f"{run_dir}: the run is {state} (summary.json state), not completed"
    return None


def card_from_run(run_dir: Path, source: str) -> tuple[dict, Path]:
    """Read ``run_dir/summary.json`` (+ config.yaml) into a card; return it with the weights path."""
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: run directory not found")
    summary_path = run_dir / "summary.json"
    summary = read_json(summary_path)
    missing = [".".join(p) for p in _REQUIRED if _get(summary, p) is None]
    if missing:
        raise ValueError(f"{summary_path}: missing {', '.join(missing)}; is this a run directory "
                         "written by `hpc train`?")
    weights = run_dir / "models" / f"{source}.safetensors"
    if not weights.is_file():
        have = sorted(p.name for p in (run_dir / "models").glob("*.safetensors"))
        raise ValueError(f"{weights}: not found (--from {source}); the run has "
                         f"{', '.join(have) or 'no saved models'}")
    try:  # parses only the JSON header: cheap, and refuses anything that is not safetensors
        with safe_open(str(weights), framework="pt") as f:
            tensors = len(list(f.keys()))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    training_config = None
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        training_config = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    data = summary.get("data") or {}
    schema = data["schema"]
    # What the trainer's reader normalized with: StreamingReader(normalize=data.normalize) applies
    # the statistics of the task's float input fields (hpc.data.normalize.input_stats), or none.
    enabled = bool(((training_config or {}).get("data") or {}).get("normalize", True))
    stats = data.get("stats") or {}
    card = {
        "card_format": CARD_FORMAT,
        "kind": "model",
        "model": {"family": summary["model"]["family"], "config": summary["model"]["config"]},
        "task": schema.get("task"),
        "schema": schema,
        "stats": stats,
        "normalization": {"enabled": enabled,
                          "stats": input_stats(schema, stats) if enabled else {},
                          # Regression: the training targets' mean/std (schema["target"]); the model
                          # predicts z * std + mean, in the target's units (hpc.models.regression).
                          **({"target": schema["target"]} if schema.get("target") else {})},
        "metrics": summary.get("metrics") or {},
        "training_config": training_config,
        "data": {"dir": data.get("dir"), "manifest_sha256": data.get("manifest_sha256")},
        "lineage": {
            "run_dir": str(run_dir.resolve()), "source": source,
            "state": summary.get("state"), "world_size": summary.get("world_size"),
            "backend": summary.get("backend"), "samples_per_s": summary.get("samples_per_s"),
            "wall_s": summary.get("wall_s"), "slurm": summary.get("slurm"),
        },
        "code_version": summary.get("code_version"),
        "versions": summary.get("versions") or {},
        "weights": {"file": WEIGHTS, "tensors": tensors},
    }
    return card, weights


def ensemble_card(members: list[dict], method: str, weights: list[float] | None = None,
                  groups: list[list[int]] | None = None, meta: dict | None = None,
                  metrics: dict | None = None, lineage: dict | None = None) -> dict:
    """A card for an ensemble of already-verified member cards (same task and input schema).

    ``card["ensemble"]`` is what ``hpc.models.combine.Combiner.from_card`` reads (task, method,
    weights, groups, meta-model config, member references); ``card["members"]`` pins each member
    to the sha256 of its model.json, so a member changed after registration is refused at load.
    """
    if method not in METHODS:
        raise ValueError(f"ensemble method {method!r} is not one of {', '.join(METHODS)}")
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
    tasks = {m.get("task") for m in members}
    if len(tasks) != 1:
        raise ValueError("ensemble members have different tasks: "
                         + ", ".join(f"{m['name']}@{m['version']}={m.get('task')}" for m in members))
    task = tasks.pop()
    check_combine(task, method)
    first = members[0]
    for m in members[1:]:
        if m["schema"].get("fields") != first["schema"].get("fields"):
            raise ValueError(f"ensemble members {first['name']}@{first['version']} and "
                             f"{m['name']}@{m['version']} have different input schemas")
    if weights is not None and len(weights) != len(members):
        raise ValueError(f"{len(weights)} weights for {len(members)} members")
    refs = [f"{m['name']}@{m['version']}" for m in members]
    return {
        "card_format": CARD_FORMAT, "kind": "ensemble", "task": task, "schema": first["schema"],
        "ensemble": {"task": task, "method": method, "weights": weights, "groups": groups,
                     "meta": meta, "members": refs},
        "members": [{"name": m["name"], "version": m["version"], "model_json_sha256": m["sha256"],
                     "family": (m.get("model") or {}).get("family"), "metrics": m.get("metrics")}
                    for m in members],
        "metrics": metrics or {}, "lineage": lineage or {},
        "model": {"family": "ensemble", "config": {"method": method, "members": refs}},
    }


def check_combine(task: str | None, method: str) -> None:
    if method == "vote" and task != "classification":
        raise ValueError(f"--combine vote needs classification models; these are {task} (use mean)")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists stay leaves. Pure."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


# Sections compared by `hpc registry diff`: metrics always shown, the rest only where they differ.
DIFF_SECTIONS = ("metrics", "model", "training_config", "schema", "data", "code_version", "versions",
                 "lineage", "ensemble")


def diff_cards(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) rows: every metric, and every other differing leaf. Pure."""
    rows = []
    for section in DIFF_SECTIONS:
        fa, fb = flatten({section: a.get(section)}), flatten({section: b.get(section)})
        for key in sorted(set(fa) | set(fb)):
            va, vb = fa.get(key, "-"), fb.get(key, "-")
            if section == "metrics" or va != vb:
                rows.append((key, va, vb))
    return rows
