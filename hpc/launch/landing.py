"""Incremental scoring of a landing zone: what is new, what changed, and the records of what was scored.

A *landing zone* is a directory operators drop inputs into (a file or a folder per day): Parquet
(or CSV) files, or shard-set directories (a directory with ``manifest.json``, made by ``hpc data
shard|synth``), at any depth. Names starting with ``.`` or ``_`` are skipped, so a drop copied
under a hidden name and renamed into place is never seen half-written. Each scheduled run
(``hpc.launch.schedule.run_landing``) scores only the drops it has not scored yet, keyed by their
path and the sha256 of their content, into ``ROOT/scored/<path>-<sha256[:12]>/`` (one output
directory per input), and records what it did under the output root ``ROOT``:

- ``_LEDGER.jsonl``: append-only, one JSON record per line and event (``scored``, ``failed``,
  ``seen`` for a drop touched without a content change), each with the drop's path, kind, size,
  mtime and sha256. It is rewritten whole through a temporary file and a rename (the old lines
  then the new ones), so a crash leaves the old ledger or the new one, never a torn line.
- ``_INDEX.json``: the published index, what consumers read: every scored input with its hash,
  output directory, rows, model and time, rewritten atomically only after its outputs are complete
  (``_SUCCESS``). A drop that failed leaves it as it was.

The decisions are pure functions of the ledger's records and what a run observes about each drop
(path, size, mtime, sha256): ``known_stats`` / ``to_hash`` (a drop is hashed only when its size or
mtime differ from the ledger's, or it is new) and ``classify`` (new / changed / unchanged).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from hpc.util.io import atomic_write_bytes, atomic_write_json, read_json, sha256_file

LEDGER, INDEX, SCORED, LOCK = "_LEDGER.jsonl", "_INDEX.json", "scored", ".lock"
MANIFEST_NAME = "manifest.json"  # a shard-set directory (hpc.data.manifest.MANIFEST_NAME)
FILE_KINDS = {".parquet": "parquet", ".csv": "csv"}  # the tables `hpc infer --input` reads
INDEX_FORMAT = 1


@dataclass(frozen=True)
class Drop:
    """One input in the landing zone as a run observes it."""
    path: str                  # relative to the landing zone, with /
    kind: str                  # "parquet" | "csv" | "shards"
    size: int                  # bytes (a shard set: all its files)
    mtime_ns: int              # a shard set: the newest of its files and directories
    sha256: str | None = None  # None until hashed (or taken from the ledger: same size and mtime)

    @property
    def stat(self) -> tuple[int, int]:
        return self.size, self.mtime_ns

    def record(self, event: str, **extra) -> dict:
        return {"event": event, **dataclasses.asdict(self), **extra}


@dataclass
class Plan:
    """What a run does with the drops it sees (``classify``)."""
    new: list[Drop] = field(default_factory=list)                      # never scored
    changed: list[tuple[Drop, dict]] = field(default_factory=list)     # (drop, its last `scored` record)
    unchanged: list[Drop] = field(default_factory=list)                # scored with this content
    gone: list[str] = field(default_factory=list)                      # scored before, no longer there

    @property
    def todo(self) -> list[Drop]:
        return self.new + [d for d, _ in self.changed]


# ------------------------------------------------------------------------------- pure decisions
def scored_state(records: Iterable[dict]) -> dict[str, dict]:
    """``{path: its last "scored" record}``: what is scored and published for each input (pure)."""
    return {r["path"]: r for r in records if r.get("event") == "scored"}


def known_stats(records: Iterable[dict]) -> dict[str, dict]:
    """``{path: the last record with a hash}`` of any event: the (size, mtime) -> sha256 the ledger
    knows, so an untouched drop is not hashed again, whether it was scored or failed (pure)."""
    return {r["path"]: r for r in records if r.get("sha256")}


def to_hash(known: dict[str, dict], seen: Iterable[Drop]) -> list[str]:
    """Paths of the drops to hash: new ones and those whose (size, mtime) differ from the ledger's (pure)."""
    return [d.path for d in seen
            if d.path not in known or (known[d.path]["size"], known[d.path]["mtime_ns"]) != d.stat]


def with_known_hashes(known: dict[str, dict], seen: Iterable[Drop]) -> list[Drop]:
    """``seen`` with the ledger's sha256 filled in where (size, mtime) still match (pure)."""
    out = []
    for d in seen:
        k = known.get(d.path)
        if d.sha256 is None and k is not None and (k["size"], k["mtime_ns"]) == d.stat:
            d = dataclasses.replace(d, sha256=k["sha256"])
        out.append(d)
    return out


def classify(scored: dict[str, dict], seen: Iterable[Drop]) -> Plan:
    """New (path never scored), changed (scored with another sha256: re-scored, reported) or
    unchanged (scored with this sha256), given every drop's hash (pure)."""
    plan = Plan()
    paths = set()
    for d in sorted(seen, key=lambda d: d.path):
        assert d.sha256 is not None, f"{d.path}: classify needs every drop's sha256"
        paths.add(d.path)
        prev = scored.get(d.path)
        if prev is None:
            plan.new.append(d)
        elif prev["sha256"] == d.sha256:
            plan.unchanged.append(d)
        else:
            plan.changed.append((d, prev))
    plan.gone = sorted(set(scored) - paths)
    return plan


def restat_records(known: dict[str, dict], unchanged: Iterable[Drop]) -> list[dict]:
    """``seen`` records for unchanged drops whose (size, mtime) moved (touched, copied again with
    the same bytes): the ledger learns the new stat, so the next run does not hash them again (pure)."""
    return [d.record("seen") for d in unchanged
            if d.path in known and (known[d.path]["size"], known[d.path]["mtime_ns"]) != d.stat]


def output_name(d: Drop) -> str:
    """``scored/<path>-<sha256[:12]>``: one output directory per input and content (pure)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", d.path.replace("/", "__")).strip("._") or "input"
    return f"{SCORED}/{slug}-{d.sha256[:12]}"


def build_index(scored: dict[str, dict], landing: str, now: str) -> dict:
    """The published index: every scored input's latest scoring, sorted by path (pure)."""
    inputs = [{"input": r["path"], "kind": r["kind"], "sha256": r["sha256"], "output": r["output"],
               "rows": r["rows"], "model": r.get("model"), "model_version": r.get("model_version"),
               "scored_at": r["time"], "run": r.get("run")} for _, r in sorted(scored.items())]
    return {"format_version": INDEX_FORMAT, "landing": landing, "updated_at": now,
            "inputs": inputs, "rows": sum(i["rows"] for i in inputs)}


def same_index(a: dict | None, b: dict) -> bool:
    """Whether two indexes list the same scorings (their time stamps aside) (pure)."""
    return a is not None and a.get("inputs") == b["inputs"] and a.get("landing") == b["landing"]


# ------------------------------------------------------------------------------- the landing zone
def find_drops(landing: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """``([(path, kind)], [ignored paths])`` under ``landing``: Parquet/CSV files and shard-set directories
    (not looked into further), at any depth; names starting with ``.`` or ``_`` are skipped."""
    drops, ignored = [], []

    def walk(d: Path, rel: str) -> None:
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            if e.name.startswith((".", "_")):
                continue
            r = f"{rel}{e.name}"
            if e.is_dir(follow_symlinks=True):
                if (Path(e.path) / MANIFEST_NAME).is_file():
                    drops.append((r, "shards"))
                else:
                    walk(Path(e.path), r + "/")
            elif Path(e.name).suffix.lower() in FILE_KINDS:
                drops.append((r, FILE_KINDS[Path(e.name).suffix.lower()]))
            else:
                ignored.append(r)

    walk(landing, "")
    return drops, ignored


def _files(path: Path) -> list[Path]:
    """A shard set's files, sorted, hidden ones (a copy in progress) left out."""
    return sorted(p for p in path.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def stat_drop(landing: Path, rel: str, kind: str) -> Drop:
    p = landing / rel
    if kind != "shards":
        st = p.stat()
        return Drop(rel, kind, st.st_size, st.st_mtime_ns)
    files = _files(p)
    stats = [f.stat() for f in files]
    dirs = [p, *{f.parent for f in files}]
    mtime = max([s.st_mtime_ns for s in stats] + [d.stat().st_mtime_ns for d in dirs])
    return Drop(rel, kind, sum(s.st_size for s in stats), mtime)


def hash_drop(landing: Path, d: Drop) -> str:
    """sha256 of a file's bytes, streamed; of a shard set: of its files' relative names and sha256s."""
    p = landing / d.path
    if d.kind != "shards":
        return sha256_file(p)
    h = hashlib.sha256()
    for f in _files(p):
        h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def observe(landing: Path, known: dict[str, dict],
            hasher: Callable[[Path, Drop], str] = hash_drop) -> tuple[list[Drop], list[str], list[str]]:
    """``(drops with their sha256, paths hashed, ignored paths)``: hashes only what ``to_hash`` names."""
    found, ignored = find_drops(landing)
    seen = [stat_drop(landing, rel, kind) for rel, kind in found]
    hashed = to_hash(known, seen)
    todo = set(hashed)
    seen = [dataclasses.replace(d, sha256=hasher(landing, d)) if d.path in todo else d for d in seen]
    return with_known_hashes(known, seen), hashed, ignored


# ------------------------------------------------------------------------------- the records
def read_ledger(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON record ({e}); the ledger is written only by "
                             "`hpc schedule` runs: restore it from a backup or move it away") from None
        if not isinstance(r, dict) or "path" not in r or "event" not in r:
            raise ValueError(f"{path}:{i}: not a ledger record (no path/event)")
        records.append(r)
    return records


def append_ledger(path: Path, records: list[dict]) -> None:
    """Append ``records``: the old bytes then the new lines, written to a temporary file and renamed."""
    if not records:
        return
    old = path.read_bytes() if path.is_file() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    new = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    atomic_write_bytes(path, old + new)


def read_index(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def publish_index(path: Path, index: dict) -> None:
    atomic_write_json(path, index)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextlib.contextmanager
def locked(root: Path) -> Iterator[bool]:
    """An exclusive lock on ``root/.lock`` for one run; yields False when another run holds it."""
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock
