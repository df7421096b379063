"""The batch-inference job: registered model(s) x a sharded data split -> one partition per shard.

Exactly once, on 1 process or N ranks (mpiexec / Slurm):

1. every rank loads and verifies the model(s) (``Registry.load_scorer``: checksums first, only
   promoted versions unless ``allow_unpromoted``) and checks the input manifest's schema against
   the model's (ValueError naming each mismatch -> exit 2);
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
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from hpc.infer.writers import FORMATS, partition_name, write_partition
from hpc.util.io import atomic_write_json, atomic_write_text, read_json, sha256_bytes, sha256_file

JOB, MANIFEST, SUCCESS, PARTS = "_JOB.json", "_MANIFEST.json", "_SUCCESS", "_parts"
COMBINES = ("mean", "vote")
# Test hook (documented in docs/infer.md): seconds to sleep after publishing each partition, so a
# test can kill a rank mid-run deterministically. Unset in production; costs nothing then.
DELAY_ENV = "HPC_INFER_TEST_DELAY_S"


@dataclass(frozen=True)
class InferConfig:
    model: str                      # NAME@ALIAS|VERSION[,NAME@...]
    input: str                      # a split directory with manifest.json
    output: str
    format: str = "parquet"
    batch_size: int = 1024
    top_k: int = 0                  # 0: every class probability; K: the K best classes
    combine: str | None = None      # several --model references: mean (default) | vote
    allow_unpromoted: bool = False
    overwrite: bool = False
    registry: str | None = None
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
def load_scorer(cfg: InferConfig, device: str = "cpu") -> tuple[Any, dict]:
    """(scorer, record): the scorer to run and what the outputs/manifest say about the model(s)."""
    from hpc.ensemble.combine import Combiner
    from hpc.registry import Registry
    from hpc.registry.card import ensemble_card
    from hpc.registry.ensemble import Ensemble

    reg = Registry(cfg.registry)
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


def check_input(model_rec: dict, manifest) -> None:
    """The input's task and fields must be the model's (ValueError naming every mismatch)."""
    from hpc.data.manifest import check_schema

    if manifest.task != model_rec["task"]:
        raise ValueError(f"{manifest.path}: the data's task is {manifest.task}, the model "
                         f"{model_rec['name']}@{model_rec['version']} was trained for {model_rec['task']}")
    try:
        check_schema(model_rec["schema"], manifest)
    except ValueError as e:
        raise ValueError(f"{e} (model {model_rec['name']}@{model_rec['version']})") from None


def id_fields(manifest) -> list[str]:
    """Input fields copied to the output: integer scalar model inputs (user, item) and id fields."""
    out = []
    for name, spec in manifest.fields.items():
        scalar_int = spec.shape == () and np.dtype(spec.dtype).kind in "iu"
        is_id = name == "id" or name.endswith("_id")
        if (scalar_int and name in manifest.input_fields) or (is_id and spec.shape == ()):
            out.append(name)
    return out


# ------------------------------------------------------------------------------ output directory
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


def claim_output(out: Path, job: dict, fmt: str, overwrite: bool) -> str:
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
    if (out / SUCCESS).exists() and _manifest_valid(out, fmt):
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
    import shutil

    for p in out.iterdir():
        if _ours(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _manifest_valid(out: Path, fmt: str) -> bool:
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


# ------------------------------------------------------------------------------ the pipeline
class _Thread(threading.Thread):
    """A daemon thread whose exception is re-raised by ``join_raise`` in the caller."""

    def __init__(self, target: Callable[[], None], name: str):
        super().__init__(name=name, daemon=True)
        self._fn, self.error = target, None

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as e:  # re-raised in the main thread
            self.error = e

    def join_raise(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, thread: _Thread):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if not thread.is_alive():
                thread.join_raise()
                raise RuntimeError(f"{thread.name} thread stopped without finishing")


def score_shards(scorer, manifest, shards: list[int], cfg: InferConfig, model_rec: dict,
                 device: torch.device, publish: Callable[[int, dict], None]) -> int:
    """Score ``shards`` in order; ``publish(shard, columns)`` runs on a writer thread. Returns rows."""
    from hpc.data.reader import iter_shard

    ids = id_fields(manifest)
    stop = threading.Event()
    batches: queue.Queue = queue.Queue(maxsize=cfg.prefetch)
    finished: queue.Queue = queue.Queue(maxsize=2)  # bounded: at most 2 shards' outputs wait
    pin = device.type == "cuda"

    def read() -> None:
        for s in shards:
            for batch in iter_shard(manifest, s, cfg.batch_size, normalize=False):
                prepared = scorer.prepare(batch)
                if pin:
                    prepared = _pin(prepared)
                keep = {"index": batch["row"], "row_id": batch["row_id"], **{k: batch[k] for k in ids}}
                _put(batches, (s, prepared, keep), stop)
            _put(batches, (s, None, None), stop)

    def write() -> None:
        while True:
            item = finished.get()
            if item is None:
                return
            publish(*item)

    from hpc.registry.ensemble import move

    reader, writer = _Thread(read, "infer-reader"), _Thread(write, "infer-writer")
    reader.start()
    writer.start()
    rows = 0
    try:
        for _ in shards:
            parts: list[tuple[dict, torch.Tensor]] = []
            while True:
                s, prepared, keep = _get(batches, reader)
                if prepared is None:
                    break
                with torch.inference_mode():
                    out = scorer(move(prepared, device, non_blocking=pin))
                parts.append((keep, out.cpu()))
            cols = _columns(s, parts, ids, cfg.top_k, model_rec)
            rows += len(cols["index"])
            while True:  # hand over to the writer, noticing if it died
                try:
                    finished.put((s, cols), timeout=0.1)
                    break
                except queue.Full:
                    if not writer.is_alive():
                        writer.join_raise()
        reader.join_raise()
    finally:
        stop.set()
        while True:
            try:
                finished.put(None, timeout=0.1)
                break
            except queue.Full:
                if not writer.is_alive():
                    break
    writer.join_raise()
    return rows


def _pin(prepared):
    if isinstance(prepared, torch.Tensor):
        return prepared.pin_memory()
    if isinstance(prepared, dict):
        return {k: _pin(v) for k, v in prepared.items()}
    return [_pin(v) for v in prepared]


def _columns(shard: int, parts: list[tuple[dict, torch.Tensor]], ids: list[str], top_k: int,
             model_rec: dict) -> dict[str, np.ndarray]:
    """One partition's columns from its batches (pure given the tensors)."""
    cat = (lambda k: torch.cat([p[0][k] for p in parts]).numpy()) if parts else (lambda k: np.zeros(0, np.int64))
    out = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0)
    n = len(cat("index"))
    cols: dict[str, np.ndarray] = {"shard": np.full(n, shard, np.int32), "index": cat("index"),
                                   "row_id": cat("row_id")}
    for k in ids:
        cols[k] = cat(k)
    if model_rec["task"] == "classification":
        probs = out.float().reshape(n, -1) if n else torch.zeros(0, model_rec["schema"]["num_classes"])
        cols["prediction"] = probs.argmax(dim=-1).numpy().astype(np.int64)
        if top_k:
            k = min(top_k, probs.shape[1])
            val, idx = torch.topk(probs, k, dim=-1)
            cols["top_k_classes"] = idx.numpy().astype(np.int64)
            cols["top_k_probs"] = val.numpy().astype(np.float32)
        else:
            cols["probabilities"] = probs.numpy().astype(np.float32)
    else:
        cols["prediction"] = out.float().reshape(-1).numpy()
    cols["model"] = np.array([model_rec["name"]] * n, dtype=object)
    cols["model_version"] = np.full(n, model_rec["version"], np.int32)
    return cols


# ------------------------------------------------------------------------------ the job
def _device(cfg: InferConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")


def job_identity(cfg: InferConfig, model_rec: dict, manifest) -> dict:
    """What must match for partitions to be reused (anything that changes their bytes)."""
    return {"models": model_rec["models"], "combine": model_rec["combine"],
            "input_manifest_sha256": manifest.sha256, "format": cfg.format,
            "batch_size": cfg.batch_size, "top_k": cfg.top_k}


def run(cfg: InferConfig, comm=None, log: Callable[[str], None] = print) -> dict:
    """Run the job on this rank; returns the summary (rank 0's includes the manifest)."""
    from hpc.data.manifest import load_manifest
    from hpc.data.partition import assign_shards
    from hpc.data.reader import check_shards
    from hpc.dist import init_comm

    start = time.time()
    comm = comm or init_comm("auto")
    world = comm.world
    device = _device(cfg, world.local_rank)
    scorer, model_rec = load_scorer(cfg, str(device))
    manifest = load_manifest(cfg.input)
    check_input(model_rec, manifest)
    check_shards(manifest)
    job = job_identity(cfg, model_rec, manifest)
    job_sha = sha256_bytes(json.dumps(job, sort_keys=True, default=str).encode())
    out = Path(cfg.output)

    state = None
    if world.is_main:
        try:
            state = ("ok", claim_output(out, job, cfg.format, cfg.overwrite))
        except ValueError as e:
            state = ("error", str(e))
    state = comm.broadcast_object(state, root=0)
    if state[0] == "error":
        raise ValueError(state[1])
    if state[1] == "complete":
        if world.is_main:
            log(f"{out}: already complete ({SUCCESS} present, every partition matches {MANIFEST}); "
                "nothing to do")
        return {"state": "complete", "rows_written": 0, "manifest": read_json(out / MANIFEST)}

    counts = manifest.sample_counts
    mine = assign_shards(counts, world.size)[world.rank]
    todo = [s for s in mine if partition_record(out, s, cfg.format, job_sha, counts[s]) is None]
    delay = float(os.environ.get(DELAY_ENV) or 0)
    meta = {"model": model_rec["name"], "model_version": model_rec["version"], "job_sha256": job_sha,
            "input_manifest_sha256": manifest.sha256}

    def publish(shard: int, cols: dict) -> None:
        name = partition_name(shard, cfg.format)
        write_partition(out / name, cfg.format, cols, meta)
        atomic_write_json(sidecar_path(out, shard), {
            "file": name, "shard": shard, "rows": len(cols["index"]), "job": job_sha,
            "bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)})
        if delay:
            time.sleep(delay)

    t0 = time.time()
    rows = score_shards(scorer, manifest, todo, cfg, model_rec, device, publish)
    scoring_s = time.time() - t0
    mine_rec = {"rank": world.rank, "shards": len(mine), "written": len(todo),
                "skipped": len(mine) - len(todo), "rows_written": rows, "scoring_s": round(scoring_s, 4),
                "device": str(device), "threads": torch.get_num_threads()}
    ranks = comm.allgather_object(mine_rec)
    comm.barrier()
    summary: dict[str, Any] = {"state": "done", "rows_written": rows, "ranks": ranks}
    if world.is_main:
        summary["manifest"] = _finish(out, cfg, job, job_sha, model_rec, manifest, ranks, start)
        total = summary["manifest"]["rows"]
        log(f"wrote {sum(r['written'] for r in ranks)} partition(s), skipped "
            f"{sum(r['skipped'] for r in ranks)} complete one(s): {total} rows of "
            f"{model_rec['name']}@{model_rec['version']} predictions in {out} ({cfg.format}, "
            f"{world.size} rank(s), {time.time() - start:.1f} s)")
    comm.barrier()
    return summary


def _finish(out: Path, cfg: InferConfig, job: dict, job_sha: str, model_rec: dict, manifest,
            ranks: list[dict], start: float) -> dict:
    from hpc.util.versions import code_version, versions

    parts = []
    for s, n in enumerate(manifest.sample_counts):
        rec = partition_record(out, s, cfg.format, job_sha, n, rehash=False)
        if rec is None:  # every rank validated or wrote its shards before the barrier
            raise RuntimeError(f"{out / partition_name(s, cfg.format)}: missing or invalid after the run")
        parts.append({"file": rec["file"], "shard": s, "rows": rec["rows"], "sha256": rec["sha256"],
                      "bytes": rec["bytes"]})
    rows = sum(p["rows"] for p in parts)
    assert rows == manifest.total_samples, (rows, manifest.total_samples)
    man = {
        "format_version": 1, "job_sha256": job_sha, **job,
        "model": {"name": model_rec["name"], "version": model_rec["version"], "task": model_rec["task"]},
        "input": {"dir": str(manifest.path), "manifest_sha256": manifest.sha256,
                  "total_samples": manifest.total_samples, "shards": len(manifest.shards)},
        "rows": rows, "partitions": parts,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start)),
        "end_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "world_size": len(ranks), "ranks": ranks,
        "scoring_s": max(r["scoring_s"] for r in ranks),
        "versions": versions(), "code_version": code_version(),
    }
    atomic_write_json(out / MANIFEST, man)
    atomic_write_text(out / SUCCESS, sha256_file(out / MANIFEST) + "\n")
    return man


def read_output(out: str | os.PathLike) -> Iterator[Path]:
    """The partitions of a finished output directory, in shard order (refuses an unfinished one)."""
    out = Path(out)
    if not (out / SUCCESS).exists():
        raise ValueError(f"{out}: no {SUCCESS}; the job has not finished (rerun it to complete it)")
    for p in read_json(out / MANIFEST)["partitions"]:
        yield out / p["file"]
