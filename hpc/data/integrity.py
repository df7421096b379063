"""What training trusts about a split's shards, and when each thing is checked.

- ``check_split(m)`` (before any rank trains: ``hpc.train.runner.preflight``, and when a
  ``StreamingReader`` opens): every shard path stays inside the split directory (no ``..``, no
  absolute path except for the foreign files an ``hpc data index`` manifest names in place, no
  symlink), no file listed twice, no sha256 listed twice (a copied shard), then presence, size,
  datasets/dtypes/shapes and exact row counts (``shardio.check_shards``). Only ``stat`` and HDF5
  metadata: no byte of data is hashed, so start-up stays cheap whatever the data size.
- ``ShardVerifier`` (in the reader): a background thread hashes (sha256, streaming sequential reads)
  each shard the rank reads the first time the run reads it, and compares it with the manifest's; a
  mismatch raises ``ShardIntegrityError`` naming the shard in the consumer at the next batch, and
  the epoch's last batch is handed out only once every shard of the epoch has verified. At every
  epoch start each shard's ``(size, mtime_ns, ctime_ns, inode)`` is compared with what it was when
  the run first saw it: any write or replacement changes ``ctime`` (which no user call can set back,
  unlike ``mtime``), so a shard changed mid-run stops the run at the next epoch without re-hashing
  bytes that were already verified (hashing every epoch cost 3-4x the read from the page cache).
  The same comparison runs again before the epoch's last batch, so a write during the epoch is
  caught in that epoch.
- ``HashCache`` (across runs: a restart, the next job on the same files): a shard whose sha256
  matched its manifest is remembered by ``(path, dev, inode, size, mtime_ns, ctime_ns)`` in a
  per-user directory (``$HPC_VERIFY_CACHE``, default ``~/.cache/hpc/verified-shards``; ``off``
  turns it off). A later run whose shard has exactly that stat and the same manifest sha256 skips
  the hash; any write or replacement changes ``ctime`` (or the inode), so the bytes are hashed again
  and a changed byte is still caught. A shard whose ``ctime`` is within ``RACY_S`` of the hash's
  start is not remembered (a write in the same timestamp tick could leave ``ctime`` unchanged).
  The directory is trusted like the data: whoever can write to it can vouch for a shard.
- ``label_problem`` (every batch): class labels in ``0..num_classes-1``, naming file and row.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from hpc.data.manifest import Manifest
from hpc.data.shardio import ShardReadError, check_shards
from hpc.util.io import atomic_write_json

HASH_BLOCK = 4 << 20  # bytes per read of the verifying thread (hashlib releases the GIL on big updates)
CACHE_ENV = "HPC_VERIFY_CACHE"  # directory of the verified-hash cache, or "off"
RACY_S = 2.0  # a shard changed this recently before its hash started is not cached (timestamp ticks)


class ShardIntegrityError(ShardReadError):
    """A shard's bytes differ from what the manifest recorded (changed, replaced, corrupted)."""


def _indexed(m: Manifest) -> bool:
    """An `hpc data index` manifest may name foreign files by absolute path (indexed in place)."""
    return bool((m.provenance or {}).get("indexed")) or str((m.provenance or {}).get("source", "")).startswith("index:")


def path_problems(m: Manifest) -> list[str]:
    """Shard entries that leave the split directory, repeat a file or a checksum, or are symlinks."""
    where = m.path / "manifest.json" if m.path else "manifest"
    root = m.path.resolve() if m.path else None
    problems, seen_file, seen_sha = [], {}, {}
    for i, info in enumerate(m.shards):
        p = Path(info.file)
        if ".." in p.parts:
            problems.append(f"{where}: shard {i} file {info.file!r} leaves the split directory ('..'); "
                            "list files inside it")
            continue
        if p.is_absolute() and not _indexed(m):
            problems.append(f"{where}: shard {i} file {info.file!r} is an absolute path; shards are named "
                            "relative to the split directory")
            continue
        path = m.shard_path(i)
        if path.is_symlink():
            problems.append(f"{path}: a symlink (to {os.readlink(path)}); shards must be regular files, "
                            "not links to other files")
            continue
        real = path.resolve()
        if root is not None and not p.is_absolute() and not real.is_relative_to(root):
            problems.append(f"{path}: resolves to {real}, outside the split directory {root}")
            continue
        if real in seen_file:
            problems.append(f"{where}: shard {i} ({info.file}) is the same file as shard {seen_file[real]}; "
                            "each shard may be listed once")
        seen_file.setdefault(real, i)
        if info.sha256 in seen_sha:
            problems.append(f"{where}: shard {i} ({info.file}) has the same sha256 as shard "
                            f"{seen_sha[info.sha256]} ({m.shards[seen_sha[info.sha256]].file}): duplicate content")
        seen_sha.setdefault(info.sha256, i)
    return problems


def check_split(m: Manifest) -> None:
    """Everything checkable without reading data (see the module doc); one ValueError listing all."""
    problems = path_problems(m)
    if problems:
        raise ValueError(f"{m.path}: {len(problems)} bad shard entr(y/ies):\n  " + "\n  ".join(problems))
    check_shards(m)


def fingerprint(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class HashCache:
    """sha256 digests that matched a manifest, by the file's ``(path, dev, inode, size, mtime_ns,
    ctime_ns)``: one small JSON file per entry, written atomically (concurrent ranks and jobs may
    write the same entry). Never fails a run: an unreadable or unwritable cache is a miss."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def from_env(cls, env=None) -> "HashCache | None":
        env = os.environ if env is None else env
        where = env.get(CACHE_ENV, "")
        if where.lower() in ("off", "0", "none", "false", "no"):
            return None
        if not where:
            base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            where = os.path.join(base, "hpc", "verified-shards")
        return cls(where)

    @staticmethod
    def key(path: Path, st: os.stat_result) -> dict:
        return {"path": os.path.realpath(path), "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}

    def _file(self, key: dict) -> Path:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.root / name[:2] / f"{name}.json"

    def lookup(self, path: Path, st: os.stat_result) -> str | None:
        """The digest verified earlier for exactly this file state, or None."""
        key = self.key(path, st)
        try:
            with open(self._file(key), encoding="utf-8") as f:
                entry = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        digest = entry.get("sha256")
        return digest if isinstance(digest, str) else None

    def store(self, path: Path, st: os.stat_result, digest: str, hash_started_ns: int) -> bool:
        """Remember ``digest`` for the state ``st`` in which the file was hashed: only if the file
        still has that state and was last changed ``RACY_S`` before the hash started."""
        try:
            now = os.stat(path)
        except OSError:
            return False
        key = self.key(path, st)
        if self.key(path, now) != key or st.st_ctime_ns > hash_started_ns - int(RACY_S * 1e9):
            return False
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_json(self._file(key), {"key": key, "sha256": digest, "verified_at": time.time()})
        except OSError:
            return False
        return True


def label_problem(m: Manifest, y: np.ndarray, row_ids: np.ndarray, offsets: np.ndarray) -> str | None:
    """A message naming file and row of the first class label outside ``0..num_classes-1``, or None."""
    if m.task != "classification" or not m.num_classes or not len(y):
        return None
    bad = (y < 0) | (y >= m.num_classes)
    if not bad.any():
        return None
    j = int(np.flatnonzero(bad)[0])
    rid = int(row_ids[j])
    shard = int(np.searchsorted(offsets, rid, side="right")) - 1
    return (f"{m.shard_path(shard)}: row {rid - int(offsets[shard])} (global row {rid}): label {int(y[j])} "
            f"is outside the classes 0..{m.num_classes - 1} (num_classes {m.num_classes} in the manifest); "
            f"{int(bad.sum())} bad label(s) in this batch. `hpc data verify` checks every label")


class ShardVerifier:
    """Hash the given shards in a background thread; ``check()`` raises on the first mismatch,
    ``finish()`` waits for all, checks the shards' stat again and raises; ``close()`` stops early
    (consumer left). ``cache``: the verified-hash cache (default: ``HashCache.from_env()``;
    False: none). ``hashed`` / ``from_cache``: the shards this verifier hashed / took from it."""

    def __init__(self, m: Manifest, shards, opened: dict[int, tuple], verified: set[int] | None = None,
                 cache: HashCache | None | bool = True):
        self.m, self.shards = m, sorted(set(int(s) for s in shards))
        self.opened = opened
        # shards whose bytes matched the manifest earlier in this run (and whose stat has not
        # changed since, which _stale checks first): not hashed again
        self.verified = verified if verified is not None else set()
        self.cache = HashCache.from_env() if cache is True else (cache or None)
        self.hashed: list[int] = []
        self.from_cache: list[int] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._stale()
        self.thread = threading.Thread(target=self._run, name="hpc-verify", daemon=True)
        self.thread.start()

    def _stale(self) -> None:
        """Cheap, at every epoch start: a shard's stat changed since the reader opened it."""
        for s in self.shards:
            path = self.m.shard_path(s)
            try:
                now = fingerprint(path)
            except OSError as e:
                raise ShardIntegrityError(f"{path}: gone mid-run ({e})") from None
            was = self.opened.setdefault(s, now)
            if now != was:
                raise ShardIntegrityError(
                    f"{path}: changed since the run opened it (size, mtime_ns, ctime_ns, inode {was} -> {now}); "
                    "the shard was overwritten or replaced mid-run: stopping")

    def _cached(self, s: int, path: Path) -> tuple[bool, os.stat_result | None]:
        """(the cache vouches for shard s as the run opened it, its stat before hashing)."""
        try:
            st = os.stat(path)
        except OSError:
            return False, None
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) != self.opened.get(s):
            return False, None  # changed since the epoch started: hash it (and _stale reports it)
        return self.cache is not None and self.cache.lookup(path, st) == self.m.shards[s].sha256, st

    def _run(self) -> None:
        for s in self.shards:
            if self._stop.is_set():
                return
            if s in self.verified:
                continue
            path, want = self.m.shard_path(s), self.m.shards[s].sha256
            hit, st = self._cached(s, path)
            if hit:
                self.from_cache.append(s)
                self.verified.add(s)
                continue
            started_ns = time.time_ns()
            h, buf = hashlib.sha256(), memoryview(bytearray(HASH_BLOCK))  # one reused buffer
            try:
                with open(path, "rb", buffering=0) as f:
                    while not self._stop.is_set():
                        n = f.readinto(buf)
                        if not n:
                            break
                        h.update(buf[:n])
                    else:
                        return
            except OSError as e:
                self.error = f"{path}: unreadable while verifying ({e})"
                return
            if h.hexdigest() != want:
                self.error = (f"{path}: sha256 {h.hexdigest()[:16]}... does not match the manifest's "
                              f"{want[:16]}...: the shard's bytes changed (corrupted, replaced or "
                              "overwritten); stopping. `hpc data verify` lists every bad shard")
                return
            self.hashed.append(s)
            self.verified.add(s)
            if self.cache is not None and st is not None:
                self.cache.store(path, st, want, started_ns)

    def check(self) -> None:
        if self.error:
            raise ShardIntegrityError(self.error)

    def finish(self) -> None:
        self.thread.join()
        self.check()
        self._stale()  # written during the epoch (after the hash, or a cached shard): caught now

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
