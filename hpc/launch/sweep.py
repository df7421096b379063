"""Sweeps: one job array member per grid point, and the summary table of their results.

``expand_grid(["optim.lr=0.1,0.01", "train.epochs=1,2"])`` is the cartesian product in the order
given (pure). The submission writes ``<out_dir>/<name>/sweep-<array id>/sweep.json`` (members:
index, overrides, job id, run directory); ``summarize`` reads each member's ``summary.json`` and
writes ``summary.json`` next to it (config values -> final metrics), which `hpc sweep show` prints.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

from hpc.util.io import atomic_write_json, read_json

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.json"


def expand_grid(specs: Sequence[str]) -> list[dict[str, str]]:
    """``["k=a,b", "k2=x"]`` -> ``[{k: a, k2: x}, {k: b, k2: x}]`` (pure; values stay strings)."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        items = [v.strip() for v in values.split(",")]
        if not sep or not key or not values or any(v == "" for v in items):
            raise ValueError(f"--grid {spec!r}: expected key=v1,v2,... with a dotted config key "
                             "(e.g. --grid optim.lr=0.1,0.01)")
        if key in dict(axes):
            raise ValueError(f"--grid {spec!r}: key {key} is already swept by another --grid")
        if len(set(items)) != len(items):
            raise ValueError(f"--grid {spec!r}: repeated values")
        axes.append((key, items))
    if not axes:
        raise ValueError("hpc submit sweep needs at least one --grid key=v1,v2,...")
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def point_overrides(point: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in point.items()]


def write_sweep(sweep_dir: Path, config: str, overrides: Sequence[str], members: list[dict]) -> Path:
    path = Path(sweep_dir) / SWEEP_FILE
    atomic_write_json(path, {"config": config, "overrides": list(overrides), "members": members})
    return path


def find_sweep(target: str, roots: Sequence[str] = ("runs",)) -> Path:
    """A sweep directory, or the array job id of one (searched under ``roots``)."""
    p = Path(target)
    if (p / SWEEP_FILE).is_file():
        return p
    if p.is_file() and p.name == SWEEP_FILE:
        return p.parent
    for root in roots:
        for cand in Path(root).glob(f"*/sweep-{target}"):
            if (cand / SWEEP_FILE).is_file():
                return cand
    raise ValueError(f"{target}: not a sweep directory (with {SWEEP_FILE}) nor the array job id of one under "
                     f"{', '.join(roots)}")


def _flatten(prefix: str, d: dict, out: dict) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            _flatten(f"{prefix}{k}.", v, out)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v


def summarize(sweep_dir: Path) -> dict:
    """Collect members' states and final metrics; write ``summary.json`` (atomic)."""
    sweep = read_json(Path(sweep_dir) / SWEEP_FILE)
    rows = []
    for m in sweep["members"]:
        row = {"index": m["index"], "job_id": m["job_id"], "params": m["params"], "state": "pending",
               "metrics": {}, "run_dir": m["run_dir"]}
        summary_path = Path(m["run_dir"]) / "summary.json"
        if summary_path.is_file():
            s = read_json(summary_path)
            row["state"] = s.get("state", "unknown")
            metrics: dict = {}
            _flatten("", s.get("metrics") or {}, metrics)
            row["metrics"] = metrics
        rows.append(row)
    result = {"config": sweep["config"], "members": rows,
              "finished": sum(r["state"] == "completed" for r in rows), "total": len(rows)}
    atomic_write_json(Path(sweep_dir) / SUMMARY_FILE, result)
    return result


def table(result: dict) -> tuple[list[str], list[list]]:
    """(headers, rows): index, job, swept values, state, then every metric any member reported."""
    members = result["members"]
    keys = list(members[0]["params"]) if members else []
    metric_keys = sorted({k for m in members for k in m["metrics"]})
    headers = ["#", "job"] + keys + ["state"] + metric_keys
    rows = [[m["index"], m["job_id"]] + [m["params"].get(k, "") for k in keys] + [m["state"]]
            + [m["metrics"].get(k, "") for k in metric_keys] for m in members]
    return headers, rows
