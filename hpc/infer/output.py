"""The output directory of `hpc infer`: who owns it, which partitions are valid, the manifest.

``OUT/part-NNNNN.<ext>`` one per input shard; ``OUT/_parts/part-NNNNN.json`` its sidecar (job
sha256, rows, bytes, sha256 of the file, written after the partition); ``OUT/_JOB.json`` the job's
identity (written by rank 0 before any partition); ``OUT/_MANIFEST.json`` then ``OUT/_SUCCESS``
(written last); ``OUT/_LOCK`` while a job runs (rank 0's ``flock``: one job per directory).
Temporary files (``.*.tmp``) are a killed run's leftovers. Readers (pandas, pyarrow datasets)
ignore names starting with ``_`` or ``.``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from hpc.infer.writers import FORMATS, partition_name
from hpc.util.io import atomic_write_json, read_json, sha256_file

JOB, MANIFEST, SUCCESS, PARTS, LOCK = "_JOB.json", "_MANIFEST.json", "_SUCCESS", "_parts", "_LOCK"


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


class Claim:
    """Rank 0's hold on an output directory for the whole job: an exclusive ``flock`` on
    ``OUT/_LOCK`` (atomic: of two jobs, exactly one gets it; the kernel drops it when the holder
    dies, even by kill -9, so a rerun after a crash is never locked out). ``release`` removes the
    lock file while still holding it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def _flock_ex(fd: int, patience_s: float = 1.0) -> bool:
    """An exclusive flock on ``fd``, retried for ``patience_s``: `hpc submit infer`'s probe
    (``lock_holder``) holds a shared lock for microseconds and must not make a job fail."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _lock(out: Path) -> Claim:
    """Take ``OUT/_LOCK`` or raise ValueError (another live job holds it); creates nothing else."""
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except IsADirectoryError:
            raise ValueError(f"{path}: a directory; not an output of hpc infer") from None
        if not _flock_ex(fd):
            try:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise ValueError(f"{out}: another hpc infer is writing this directory ({holder}); wait for "
                             "it, or choose another --output")
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder removed after we opened it
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
            return Claim(path, fd)
        os.close(fd)


def lock_holder(out: str | os.PathLike) -> str | None:
    """Who holds ``OUT/_LOCK`` now (``pid P on HOST``), or None: a probe for `hpc submit infer`,
    which refuses an output a running job writes before queueing another. Creates nothing and
    holds nothing (a job queued meanwhile is still refused by its own claim)."""
    try:
        fd = os.open(Path(out) / LOCK, os.O_RDONLY)
    except OSError:  # no lock file (or no directory): nobody writes there
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 200).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def claim_output(out: Path, job: dict, overwrite: bool, log=print) -> tuple[str, Claim | None]:
    """Rank 0, before any partition is written: ('complete', None) (nothing to do) or ('run', claim)
    with the directory locked until ``claim.release()``.

    Only a directory this very job identity wrote (its ``_JOB.json``) is resumed; any other
    content is refused (ValueError, nothing removed) unless ``overwrite``, which removes the
    files of hpc infer's output names and logs each; names hpc infer never writes are always
    refused."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out}: a file, not a directory; give a new or empty directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    claim = _lock(out)
    try:
        state = _claim_locked(out, job, overwrite, log)
    except BaseException:
        claim.release()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only what this job created
        raise
    if state == "complete":
        claim.release()
        return state, None
    return state, claim


def _claim_locked(out: Path, job: dict, overwrite: bool, log) -> str:
    names = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    foreign = [n for n in names if not _ours(n)]
    if foreign:
        raise ValueError(f"{out}: holds files hpc infer did not write ({', '.join(foreign[:5])}); "
                         "use an empty or new --output directory")
    old = None
    if (out / JOB).exists():
        try:
            old = read_json(out / JOB)
        except ValueError:
            old = {}
    # Without our _JOB.json, nothing proves hpc infer wrote these files (part-*.parquet, _SUCCESS
    # of a Spark/pyarrow dataset look alike); a run killed before _JOB.json left at most its temp.
    leftovers = [n for n in names if not (n.startswith(f".{JOB}.") and n.endswith(".tmp"))]
    differs = bool(_identity_diff(old, job)) if old is not None else bool(leftovers)
    if differs:
        what = (f"written by another job ({'; '.join(_identity_diff(old, job))})" if old is not None
                else f"holds files with no {JOB} of hpc infer ({', '.join(leftovers[:5])})")
        if not overwrite:
            raise ValueError(f"{out}: {what}; pass --overwrite to remove them, or choose another --output")
        removed = _clear(out)
        log(f"{out}: --overwrite removed {len(removed)} entr(ies): {', '.join(removed)}")
    elif old is None:
        _clear(out)  # only the temporary _JOB.json of a run killed while writing it
    if (out / SUCCESS).exists() and _manifest_valid(out):
        return "complete"
    # From here on the directory is visibly incomplete until the new _SUCCESS.
    for name in (SUCCESS, MANIFEST):
        (out / name).unlink(missing_ok=True)
    for d in (out, out / PARTS):
        for p in d.glob(".*.tmp") if d.is_dir() else ():
            p.unlink(missing_ok=True)  # a killed run's half-written files; we hold the lock: nobody writes
    if not (out / JOB).exists():
        atomic_write_json(out / JOB, job)
    return "run"


def _clear(out: Path) -> list[str]:
    removed = []
    for p in sorted(out.iterdir()):
        if p.name != LOCK and _ours(p.name):
            removed.append(p.name + ("/" if p.is_dir() else ""))
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return removed


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
