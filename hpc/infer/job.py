"""The batch-inference job: registered model(s) x a sharded data split or tables (CSV/Parquet files)
-> one partition per shard or file.

Exactly once, on 1 process or N ranks (mpiexec, or Slurm tasks on one or several nodes:
``hpc submit infer --nodes N --tasks-per-node T``; the ranks only meet at the start and the end):

1. every rank loads and verifies the model(s) (``Registry.load_scorer``: checksums first, only
   promoted versions unless ``allow_unpromoted``) and checks the input against the model
   (``hpc.infer.inputs``: a manifest's schema, targets aside; a table's columns, which rank 0 also
   counts and hashes for the job identity) (ValueError naming each mismatch -> exit 2);
2. rank 0 claims the output directory: ``_JOB.json`` records the job's identity (models and
   their model.json sha256, input manifest sha256, format, batch size, top-k, combine); a
   directory holding another identity is refused unless ``overwrite``; a previous run's
   ``_SUCCESS``/``_MANIFEST.json`` are removed before anything is rewritten, and stale temporary
   files of a killed run are deleted;
3. each rank scores its shards (``assign_shards``, balanced by samples) in manifest order, skipping
   those whose partition is complete and valid (its sidecar ``_parts/part-NNNNN.json`` names this
   job, its row count and the file's sha256, which is recomputed). Reading + normalization (a
   prefetch thread), compute (this thread) and writing (a writer thread) overlap;
4. after a barrier, rank 0 re-validates every partition, writes ``_MANIFEST.json`` and only then
   ``_SUCCESS``.

A partition's bytes depend only on the job identity and the shard (batches start at the shard's
first row; writers are deterministic), so a rerun after kill -9 at any point reproduces an
uninterrupted run's files byte for byte on the same device type and thread count.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hpc.data.partition import assign_shards
from hpc.dist import init_comm
from hpc.infer.inputs import add_counts, check_before_start, check_input, open_input
from hpc.infer.output import (MANIFEST, SUCCESS, claim_output, partition_record, read_output,
                              sidecar_path)
from hpc.infer.pipeline import score_parts
from hpc.infer.writers import FORMATS, partition_name, write_partition
from hpc.models.combine import Combiner
from hpc.registry import Registry
from hpc.registry.card import ensemble_card
from hpc.registry.scorers import Ensemble
from hpc.util.io import atomic_write_json, atomic_write_text, read_json, sha256_bytes, sha256_file
from hpc.util.progress import Progress
from hpc.util.versions import code_version, versions

__all__ = ["InferConfig", "check_input", "load_scorer", "preflight", "read_output", "run"]
COMBINES = ("mean", "vote")
# Test hook (documented in docs/infer.md): seconds to sleep after publishing each partition, so a
# test can kill a rank mid-run deterministically. Unset in production; costs nothing then.
DELAY_ENV = "HPC_INFER_TEST_DELAY_S"


@dataclass(frozen=True)
class InferConfig:
    model: str                      # NAME@ALIAS|VERSION[,NAME@...]
    input: str                      # a split directory (manifest.json), or a CSV/Parquet file or directory
    output: str
    format: str = "parquet"
    batch_size: int = 1024
    top_k: int = 0                  # 0: every class probability; K: the K best classes
    combine: str | None = None      # several --model references: mean (default) | vote
    allow_unpromoted: bool = False
    overwrite: bool = False
    registry: str | None = None
    allow_nonfinite: bool = False   # publish NaN/inf predictions (refused by default)
    prefetch: int = 4               # batches read ahead of compute
    device: str = "auto"            # auto (cuda if available) | cpu | cuda

    def __post_init__(self) -> None:
        if not self.refs:
            raise ValueError(f"--model {self.model!r}: give NAME@ALIAS or NAME@VERSION (comma-separated "
                             "for an ensemble)")
        if self.format not in FORMATS:
            raise ValueError(f"--format {self.format!r}: valid are {', '.join(FORMATS)}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k}: must be >= 0 (0 writes every class probability)")
        if self.combine is not None and self.combine not in COMBINES:
            raise ValueError(f"--combine {self.combine!r}: valid are {', '.join(COMBINES)}")
        if self.combine is not None and len(self.refs) < 2:
            raise ValueError(f"--combine {self.combine} needs several --model references (a,b); "
                             "a registered ensemble combines as registered")
        if self.prefetch < 1:
            raise ValueError(f"prefetch {self.prefetch}: must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: valid are auto, cpu, cuda")

    @property
    def refs(self) -> list[str]:
        return [r.strip() for r in self.model.split(",") if r.strip()]


# ------------------------------------------------------------------------------ model and input
def load_scorer(cfg: InferConfig, device: str = "cpu", pinned: list[str] | None = None) -> tuple[Any, dict]:
    """(scorer, record): the scorer to run and what the outputs/manifest say about the model(s).

    ``pinned``: the NAME@VERSION rank 0 resolved each reference to (and checked promoted then):
    the other ranks load exactly those, so a promotion while the job starts cannot split them."""
    reg = Registry(cfg.registry)
    if pinned is not None:
        loaded = [reg.load_scorer(r, True, device) for r in pinned]
    else:
        loaded = [reg.load_scorer(r, cfg.allow_unpromoted, device) for r in cfg.refs]
    cards = [c for _, c in loaded]
    pinned = [{"ref": r, "name": c["name"], "version": c["version"], "model_json_sha256": c["sha256"],
               "kind": c["kind"], "members": c.get("members")} for r, c in zip(cfg.refs, cards)]
    if len(loaded) == 1:
        scorer, card = loaded[0]
        return scorer, {"name": card["name"], "version": card["version"], "task": card["task"],
                        "schema": card["schema"], "combine": (card.get("ensemble") or {}).get("method"),
                        "models": pinned}
    method = cfg.combine or "mean"
    ens = ensemble_card(cards, method)  # validates: same task and input fields, method fits task
    combiner = Combiner(task=ens["task"], method=method, members=ens["ensemble"]["members"])
    name = "+".join(f"{c['name']}@{c['version']}" for c in cards)
    # An ad-hoc ensemble has no registry version of its own: -1 in the output, members in the manifest.
    return Ensemble([s for s, _ in loaded], combiner), {
        "name": name, "version": -1, "task": ens["task"], "schema": ens["schema"], "combine": method,
        "models": pinned}


def preflight(cfg: InferConfig) -> None:
    """What `hpc infer --nproc N` checks before it starts ranks (a ValueError: exit 2): the model(s)
    load and verify, and the input fits them (a split's schema, a table's columns)."""
    check_output(cfg.output)
    scorer, model_rec = load_scorer(cfg, "cpu")
    check_before_start(cfg.input, scorer, model_rec)


def check_output(output: str) -> None:
    """--output must be a directory or a new path (ValueError: exit 2, not a traceback)."""
    out = Path(output)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"--output {output}: {p} is a file, not a directory; give a new or "
                                 "empty directory")
            return


def check_finite(cols: dict, where: str) -> None:
    """Refuse to publish non-finite predictions (ValueError naming the partition and the count)."""
    bad = None
    for k in ("prediction", "probabilities", "top_k_probs"):
        v = cols.get(k)
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            rows = ~np.isfinite(v.reshape(len(v), -1)).all(axis=1)
            bad = rows if bad is None else bad | rows
    n = int(bad.sum()) if bad is not None else 0
    if n:
        raise ValueError(f"{where}: {n} of {len(bad)} row(s) have non-finite (NaN/inf) predictions; "
                         "not published (pass --allow-nonfinite to write them anyway)")


# ------------------------------------------------------------------------------ the job
def _device(cfg: InferConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")


def job_identity(cfg: InferConfig, model_rec: dict, source) -> dict:
    """What must match for partitions to be reused (anything that changes their bytes); a table
    input's sha256 covers its files' names and contents."""
    return {"models": model_rec["models"], "combine": model_rec["combine"],
            "input_manifest_sha256": source.sha256, "format": cfg.format,
            "batch_size": cfg.batch_size, "top_k": cfg.top_k}


def run(cfg: InferConfig, comm=None, log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Run the job on this rank; returns the summary (rank 0's includes the manifest).

    ``progress``: rank 0 reports the rows IT has scored of the rows of ITS shards on stderr
    (``hpc.util.progress``): no collective or shared-file polling per line, and since shards are
    balanced by samples, rank 0's share tracks the whole job's."""
    start = time.time()
    own_comm = comm is None
    comm = comm or init_comm("auto")
    summary = _run(cfg, comm, log, start, progress)
    if own_comm:  # on success only: after an exception the comm's hook must still abort the others
        comm.close()
    return summary


def _run(cfg: InferConfig, comm, log: Callable[[str], None], start: float, progress: bool = False) -> dict:
    world = comm.world
    device = _device(cfg, world.local_rank)
    # Rank 0 resolves NAME@ALIAS once; every other rank loads the pinned NAME@VERSION it broadcasts.
    pins = None
    if world.is_main:
        try:
            check_output(cfg.output)
            scorer, model_rec = load_scorer(cfg, str(device))
            pins = ("ok", [f"{m['name']}@{m['version']}" for m in model_rec["models"]])
        except ValueError as e:
            pins = ("error", str(e))
    pins = comm.broadcast_object(pins, root=0)
    if pins[0] == "error":
        raise ValueError(pins[1])
    if not world.is_main:
        scorer, model_rec = load_scorer(cfg, str(device), pinned=pins[1])
    source = open_input(cfg.input, scorer, model_rec, comm)
    job = job_identity(cfg, model_rec, source)
    job_sha = sha256_bytes(json.dumps(job, sort_keys=True, default=str).encode())
    out = Path(cfg.output)

    state, claim = None, None
    if world.is_main:
        try:
            status, claim = claim_output(out, job, cfg.overwrite, log)
            state = ("ok", status)
        except ValueError as e:
            state = ("error", str(e))
    try:
        return _scored(cfg, comm, log, start, progress, state, scorer, model_rec, source, job, job_sha, out)
    finally:
        if claim is not None:
            claim.release()


def _scored(cfg: InferConfig, comm, log, start: float, progress: bool, state, scorer, model_rec: dict,
            source, job: dict, job_sha: str, out: Path) -> dict:
    world = comm.world
    device = _device(cfg, world.local_rank)
    state = comm.broadcast_object(state, root=0)
    if state[0] == "error":
        raise ValueError(state[1])
    if state[1] == "complete":
        if world.is_main:
            log(f"{out}: already complete ({SUCCESS} present, every partition matches {MANIFEST}); "
                "nothing to do")
        return {"state": "complete", "rows_written": 0, "manifest": read_json(out / MANIFEST)}

    counts = source.counts
    mine = assign_shards(source.weights, world.size)[world.rank]
    todo = [s for s in mine if partition_record(out, s, cfg.format, job_sha, counts[s]) is None]
    delay = float(os.environ.get(DELAY_ENV) or 0)
    meta = {"model": model_rec["name"], "model_version": model_rec["version"], "job_sha256": job_sha,
            "input_manifest_sha256": source.sha256}

    def publish(shard: int, cols: dict, table_counts: dict) -> None:
        name = partition_name(shard, cfg.format)
        if not cfg.allow_nonfinite:
            check_finite(cols, f"{out / name} (input shard/file {shard})")
        write_partition(out / name, cfg.format, cols, meta)
        atomic_write_json(sidecar_path(out, shard), {
            "file": name, "shard": shard, "rows": len(cols["index"]), "job": job_sha,
            "bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name),
            **source.part_record(shard), **({"table": table_counts} if table_counts else {})})
        if delay:
            time.sleep(delay)

    t0 = time.time()
    label = "infer" if world.size == 1 else f"infer rank 0 of {world.size}"
    with Progress(sum(counts[s] for s in todo), label=label, enabled=progress and world.is_main) as bar:
        waits = score_parts(scorer, source, todo, cfg.batch_size, cfg.prefetch, cfg.top_k, model_rec,
                            device, publish, bar)
    rows = waits.pop("rows")
    scoring_s = time.time() - t0
    mine_rec = {"rank": world.rank, "node": world.node_name, "node_rank": world.node_rank,
                "shards": len(mine), "written": len(todo), "written_parts": todo,
                "skipped": len(mine) - len(todo), "rows_written": rows, "scoring_s": round(scoring_s, 4), **waits,
                "device": str(device), "threads": torch.get_num_threads()}
    ranks = comm.allgather_object(mine_rec)
    comm.barrier()
    summary: dict[str, Any] = {"state": "done", "rows_written": rows, "ranks": ranks}
    if world.is_main:
        summary["manifest"] = _finish(out, cfg, job, job_sha, model_rec, source, ranks, start)
        total = summary["manifest"]["rows"]
        log(f"wrote {sum(r['written'] for r in ranks)} partition(s), skipped "
            f"{sum(r['skipped'] for r in ranks)} complete one(s): {total} rows of "
            f"{model_rec['name']}@{model_rec['version']} predictions in {out} ({cfg.format}, "
            f"{world.size} rank(s){placement(ranks)}, {time.time() - start:.1f} s)"
            + (f"; read them with pandas.read_parquet({str(out)!r})" if cfg.format == "parquet" else ""))
    comm.barrier()
    return summary


def placement(ranks: list[dict]) -> str:
    """``" on 2 node(s): n1 rank(s) 0-1, n2 rank(s) 2-3"`` for the summary line ("" on one node)."""
    nodes: dict[str, list[int]] = {}
    for r in sorted(ranks, key=lambda r: r["rank"]):
        nodes.setdefault(str(r.get("node")), []).append(r["rank"])
    if len(nodes) < 2:
        return ""

    def span(rs: list[int]) -> str:
        return f"{rs[0]}-{rs[-1]}" if rs == list(range(rs[0], rs[-1] + 1)) and len(rs) > 1 else ",".join(map(str, rs))

    return f" on {len(nodes)} node(s): " + ", ".join(f"{n} rank(s) {span(rs)}" for n, rs in nodes.items())


def _finish(out: Path, cfg: InferConfig, job: dict, job_sha: str, model_rec: dict, source,
            ranks: list[dict], start: float) -> dict:
    parts, table = [], {}
    for s, n in enumerate(source.counts):
        rec = partition_record(out, s, cfg.format, job_sha, n, rehash=False)
        if rec is None:  # every rank validated or wrote its shards before the barrier
            raise RuntimeError(f"{out / partition_name(s, cfg.format)}: missing or invalid after the run")
        parts.append({"file": rec["file"], "shard": s, "rows": rec["rows"], "sha256": rec["sha256"],
                      "bytes": rec["bytes"], **source.part_record(s)})
        add_counts(table, rec.get("table"))  # from the sidecars: partitions of an earlier run count too
    rows = sum(p["rows"] for p in parts)
    assert rows == source.total, (rows, source.total)
    man = {
        "format_version": 1, "job_sha256": job_sha, **job,
        "model": {"name": model_rec["name"], "version": model_rec["version"], "task": model_rec["task"]},
        "input": source.record(),
        "rows": rows, "partitions": parts,
        **({"table": {"imputed_cells": table.get("imputed", {}),
                      "unseen_categories": table.get("unseen", {})}} if source.kind == "files" else {}),
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start)),
        "end_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "world_size": len(ranks), "ranks": ranks,
        "scoring_s": max(r["scoring_s"] for r in ranks),
        "versions": versions(), "code_version": code_version(),
    }
    atomic_write_json(out / MANIFEST, man)
    atomic_write_text(out / SUCCESS, sha256_file(out / MANIFEST) + "\n")
    return man


