"""The output directory of `hpc infer`: who owns it, which partitions are valid, the manifest.

``OUT/part-NNNNN.<ext>`` one per input shard; ``OUT/_parts/part-NNNNN.json`` its sidecar (job
sha256, rows, bytes, sha256 of the file, written after the partition); ``OUT/_JOB.json`` the job's
identity (written by rank 0 before any partition); ``OUT/_MANIFEST.json`` then ``OUT/_SUCCESS``
(written last). Temporary files (``.*.tmp``) are a killed run's leftovers. Readers (pandas,
pyarrow datasets) ignore names starting with ``_`` or ``.``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from hpc.infer.writers import FORMATS, partition_name
from hpc.util.io import atomic_write_json, read_json, sha256_file

JOB, MANIFEST, SUCCESS, PARTS = "_JOB.json", "_MANIFEST.json", "_SUCCESS", "_parts"


def _ours(name: str) -> bool:
    ext = tuple(f".{e}" for e in FORMATS.values())
    return (name in (JOB, MANIFEST, SUCCESS, PARTS) or (name.startswith("part-") and name.endswith(ext))
            or (name.startswith(".") and name.endswith(".tmp")))


def _identity_diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two job identities (models shown as NAME@VERSION)."""
    def show(k: str, v: Any) -> str:
        if k == "models" and isinstance(v, list):
            return ",".join(f"{m.get('name')}@{m.get('version')}" for m in v if isinstance(m, dict))
        return json.dumps(v, default=str)[:80]

    return [f"{k} {show(k, old.get(k))} (there) vs {show(k, new.get(k))} (this job)"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def claim_output(out: Path, job: dict, overwrite: bool) -> str:
    """Rank 0, before any partition is written: 'complete' (nothing to do) or 'run'."""
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name))
    if foreign:
        raise ValueError(f"{out}: holds files hpc infer did not write ({', '.join(foreign[:5])}); "
                         "use an empty or new --output directory")
    if (out / JOB).exists():
        try:
            old = read_json(out / JOB)
        except ValueError:
            old = {}
        diff = _identity_diff(old, job)
        if diff and not overwrite:
            raise ValueError(f"{out}: written by another job ({'; '.join(diff)}); pass --overwrite to "
                             "replace it, or choose another --output")
        if diff:
            _clear(out)
    elif any(out.iterdir()):
        _clear(out)  # only our leftovers (temporary files of a run killed before _JOB.json)
    if (out / SUCCESS).exists() and _manifest_valid(out):
        return "complete"
    # From here on the directory is visibly incomplete until the new _SUCCESS.
    for name in (SUCCESS, MANIFEST):
        (out / name).unlink(missing_ok=True)
    for d in (out, out / PARTS):
        for p in d.glob(".*.tmp") if d.is_dir() else ():
            p.unlink(missing_ok=True)  # a killed run's half-written files; nobody writes yet
    if not (out / JOB).exists():
        atomic_write_json(out / JOB, job)
    return "run"


def _clear(out: Path) -> None:
    for p in out.iterdir():
        if _ours(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _manifest_valid(out: Path) -> bool:
    try:
        man = read_json(out / MANIFEST)
        return all(sha256_file(out / p["file"]) == p["sha256"] for p in man["partitions"])
    except (ValueError, KeyError, OSError):
        return False


def sidecar_path(out: Path, shard: int) -> Path:
    return out / PARTS / f"part-{shard:05d}.json"


def partition_record(out: Path, shard: int, fmt: str, job_sha: str, rows: int,
                     rehash: bool = True) -> dict | None:
    """The sidecar of a complete, valid partition of this job, or None (then it is (re)written).

    ``rehash=False`` trusts the sidecar's sha256 (checks the size only): for partitions this run
    wrote or already re-hashed, so rank 0 does not read every partition once more at the end.
    """
    try:
        rec = read_json(sidecar_path(out, shard))
        path = out / rec["file"]
        ok = (rec["job"] == job_sha and rec["rows"] == rows and rec["file"] == partition_name(shard, fmt)
              and path.stat().st_size == rec["bytes"] and (not rehash or sha256_file(path) == rec["sha256"]))
    except (ValueError, KeyError, OSError, TypeError):
        return None
    return rec if ok else None


def read_output(out: str | os.PathLike) -> Iterator[Path]:
    """The partitions of a finished output directory, in shard order (refuses an unfinished one)."""
    out = Path(out)
    if not (out / SUCCESS).exists():
        raise ValueError(f"{out}: no {SUCCESS}; the job has not finished (rerun it to complete it)")
    for p in read_json(out / MANIFEST)["partitions"]:
        yield out / p["file"]
