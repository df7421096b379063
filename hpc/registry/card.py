"""Model cards: what ``model.json`` holds, built from a run directory; and building a model from one.

The card is everything needed to rebuild and trust a model without its run directory: family and
config (to call ``hpc.models.build_model``), the input schema and normalization statistics of the
training data (checked and applied by batch inference), metrics, the resolved training config and
lineage (run directory, data manifest sha256, code and package versions, Slurm job).
"""

from __future__ import annotations

from hpc.data.normalize import input_stats  # noqa: F401 - re-exported for callers of card

from pathlib import Path
from typing import Any

from hpc.util.io import read_json, sha256_bytes

_REQUIRED = (("model", "family"), ("model", "config"), ("data", "schema"))


def _get(d: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def card_from_run(run_dir: Path, source: str) -> tuple[dict, Path]:
    """Read ``run_dir/summary.json`` (+ config.yaml) into a card; return it with the weights path."""
    from safetensors import safe_open

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
        import yaml

        training_config = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    data = summary.get("data") or {}
    schema = data["schema"]
    # What the trainer's reader normalized with: StreamingReader(normalize=data.normalize) applies
    # the statistics of the task's float input fields (hpc.data.normalize.input_stats), or none.
    enabled = bool(((training_config or {}).get("data") or {}).get("normalize", True))
    stats = data.get("stats") or {}
    card = {
        "card_format": 1,
        "kind": "model",
        "model": {"family": summary["model"]["family"], "config": summary["model"]["config"]},
        "task": schema.get("task"),
        "schema": schema,
        "stats": stats,
        "normalization": {"enabled": enabled,
                          "stats": input_stats(schema, stats) if enabled else {}},
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
        "weights": {"file": "model.safetensors", "tensors": tensors},
    }
    return card, weights


def ensemble_card(members: list[dict], method: str, weights: list[float] | None = None,
                  groups: list[list[int]] | None = None, meta: dict | None = None,
                  metrics: dict | None = None, lineage: dict | None = None) -> dict:
    """A card for an ensemble of already-verified member cards (same task and input schema).

    ``card["ensemble"]`` is what ``hpc.ensemble.combine.Combiner.from_card`` reads (task, method,
    weights, groups, meta-model config, member references); ``card["members"]`` pins each member
    to the sha256 of its model.json, so a member changed after registration is refused at load.
    """
    from hpc.ensemble.combine import METHODS

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
        "card_format": 1, "kind": "ensemble", "task": task, "schema": first["schema"],
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


def read_verified(vdir: Path, fname: str) -> bytes:
    """The bytes of one artifact file, hashed as read and compared with SHA256SUMS.

    Hashing the very bytes we deserialize (not the file again later) means a swap between
    ``verify`` and load cannot slip through; it costs one in-memory copy of the file while loading.
    """
    from hpc.registry.store import SUMS, IntegrityError, parse_sums

    data = (vdir / fname).read_bytes()
    want = parse_sums((vdir / SUMS).read_text(encoding="utf-8"), str(vdir / SUMS)).get(fname)
    if want is None or sha256_bytes(data) != want:
        raise IntegrityError(f"{vdir / fname}: changed (sha256 does not match {SUMS})")
    return data


def build_scorer(registry, card: dict, device: str = "cpu"):
    """A verified card -> ``Single`` or ``Ensemble`` scorer (see hpc.registry.ensemble)."""
    from safetensors.torch import load as load_safetensors

    from hpc.ensemble.combine import Combiner
    from hpc.registry.ensemble import Ensemble, Single
    from hpc.registry.store import META, Ref

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


def build_model_from_card(registry, card: dict, device: str = "cpu"):
    """The plain nn.Module (eval mode) of a verified single-model card."""
    import torch
    from safetensors.torch import load as load_safetensors

    from hpc.models import build_model
    from hpc.registry.store import WEIGHTS, Ref

    vdir = registry.version_dir(Ref(card["name"], card["version"]))
    state = load_safetensors(read_verified(vdir, WEIGHTS))
    # A family registered by a plugin (training config `imports:`, e.g. hpc.ensemble.hierarchical)
    # must be imported before it can be built. These are names of installed modules recorded in
    # the verified card, never code stored in the artifact.
    from hpc.models import list_models

    if card["model"]["family"] not in list_models():
        import importlib

        for name in (card.get("training_config") or {}).get("imports") or []:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise ValueError(f"{vdir}: model family {card['model']['family']!r} needs module {name!r} "
                                 f"(from the training config's imports), which cannot be imported: {e}") from None
    model = build_model(card["model"]["family"], card["model"]["config"], card["schema"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{vdir / WEIGHTS}: weights do not fit {card['model']['family']} "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.to(torch.device(device)).eval()


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
