"""`hpc data verify`: every shard against its manifest, one line per problem naming the file.

Checks presence, size, sha256 (the expensive part: one sequential read of every byte), that h5py
opens the file, every field's dataset, dtype, per-sample shape and row count, and (with
checksums) the class counts recomputed from the labels.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from hpc.data.integrity import path_problems
from hpc.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from hpc.data.shardio import dataset_problem
from hpc.util.io import sha256_file
from hpc.util.progress import Progress


def _check_shard(m: Manifest, i: int, checksums: bool, counts: np.ndarray | None) -> list[str]:
    info, path = m.shards[i], m.shard_path(i)
    if not path.exists():
        return [f"{path}: missing"]
    size = os.path.getsize(path)
    if size != info.bytes:
        return [f"{path}: size {size} bytes, manifest says {info.bytes} (truncated or replaced)"]
    out = []
    if checksums:
        digest = sha256_file(path)
        if digest != info.sha256:
            out.append(f"{path}: sha256 {digest[:16]}... does not match the manifest's {info.sha256[:16]}... "
                       "(the file's bytes changed)")
    try:
        with h5py.File(path, "r") as f:
            for name, spec in m.fields.items():
                dpath = info.datasets.get(name, "/" + name)
                ds = f.get(dpath)
                problem = dataset_problem(path, dpath, ds, spec, info.samples, name)
                if problem:
                    out.append(problem)
                elif checksums and counts is not None and name == "y":
                    step = 1 << 20
                    for a in range(0, info.samples, step):
                        y = ds[a:a + step].astype(np.int64)
                        if len(y) and (y.min() < 0 or y.max() >= len(counts)):
                            out.append(f"{path}: labels outside 0..{len(counts) - 1}")
                            break
                        counts += np.bincount(y, minlength=len(counts))
    except OSError as e:
        out.append(f"{path}: h5py cannot open it ({e})")
    return out


def verify(split_dir: str | os.PathLike, checksums: bool = True,
           progress: Progress | None = None) -> tuple[list[str], int]:
    """Return (problems, shards checked) for one split; ``progress`` advances by each shard's rows."""
    try:
        m = load_manifest(split_dir)
    except ValueError as e:
        return [str(e)], 0
    problems: list[str] = path_problems(m)  # outside the split directory, listed twice, symlinks
    where = m.path / MANIFEST_NAME
    counts = None
    if m.task == "classification" and m.class_counts is not None:
        counts = np.zeros(len(m.class_counts), np.int64)
        if sum(m.class_counts) != m.total_samples:
            problems.append(f"{where}: class_counts sum to {sum(m.class_counts)}, total_samples is {m.total_samples}")
    for i in range(len(m.shards)):
        problems += _check_shard(m, i, checksums, counts)
        if progress is not None:
            progress.update(m.shards[i].samples)
    if checksums and counts is not None and not problems and counts.tolist() != list(m.class_counts):
        problems.append(f"{where}: class counts in the shards {counts.tolist()} differ from the manifest's "
                        f"{m.class_counts}")
    return problems, len(m.shards)


def verify_tree(path: str | os.PathLike, checksums: bool = True, progress: bool = False) -> tuple[list[str], int]:
    """Verify a split directory, or every split under a data set directory.

    ``progress``: rows checked so far, of all splits, on stderr (``hpc.util.progress``)."""
    p = Path(path)
    if not p.exists():
        return [f"{p}: no such directory"], 0
    splits = [p] if (p / MANIFEST_NAME).exists() else sorted(d.parent for d in p.glob(f"*/{MANIFEST_NAME}"))
    if not splits:
        return [f"{p}: no {MANIFEST_NAME} here or in its subdirectories"], 0
    bar = Progress(_total_rows(splits) if progress else None, label="verify", enabled=progress)
    problems, n = [], 0
    for s in splits:
        pr, k = verify(s, checksums, bar)
        problems += pr
        n += k
    bar.close()
    return problems, n


def _total_rows(splits: list[Path]) -> int:
    """Rows the manifests list (an unreadable manifest counts 0 here; verify() reports it)."""
    total = 0
    for s in splits:
        try:
            total += load_manifest(s).total_samples
        except ValueError:
            pass
    return total
