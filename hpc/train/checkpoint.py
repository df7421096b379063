"""Atomic, verifiable, multi-rank checkpoints: safetensors for tensors, JSON for the rest (no pickle).

Layout of ``RUN/checkpoints/``::

    step-000000120/  model.safetensors  optim.safetensors  rank-00000.safetensors  rank-00000.json
                     ...one pair per rank (RNG states, reader position)...  meta.json
                     SHA256SUMS (sha256 of every other file, meta.json included; written last)
    latest           the name of the newest complete checkpoint (a file, replaced atomically)

Saving: rank 0 makes a temporary directory next to the final one and broadcasts its path; every
rank writes its own files there and reports their sha256; rank 0 writes the model, optimizer and
``meta.json``, then ``SHA256SUMS`` (last: the integrity record of every file), fsyncs, renames the directory into place, then moves ``latest`` and prunes to
the newest ``keep``. A crash at any moment leaves ``latest`` pointing at a complete checkpoint.

Loading: rank 0 verifies candidates newest first (``latest``'s target, then older ``step-*``):
every file of the directory listed in ``SHA256SUMS`` with its sha256 (``meta.json`` too), nothing
listed missing, nothing unlisted; a damaged one is reported by name and the previous complete one
tried. A checkpoint written before ``SHA256SUMS`` existed is verified by ``meta.json``'s list (which
cannot cover ``meta.json`` itself) and loaded with a warning. Rank 0 broadcasts the choice, so every
rank loads the same checkpoint; then it removes the partial ``.step-*.tmp`` directories that crashed
writers left, skipping any a live writer holds (``flock``). Optimizer hyper-parameters (lr,
momentum, betas, weight decay, ...) come from the config, never from the checkpoint: only the
optimizer's state (moments, step counts) is restored.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hpc.train.config import AllRanksError
from hpc.util.io import atomic_dir, atomic_path, atomic_write_json, atomic_write_text, read_json, sha256_file

log = logging.getLogger("hpc.train")
_STEP_RE = re.compile(r"^step-(\d+)$")
_PARTIAL_RE = re.compile(r"^\.(step-\d+\.\S+\.tmp|stale-step-\d+-\d+)$")
LATEST = "latest"
SUMS = "SHA256SUMS"


# -- nested state <-> (JSON tree, flat tensors) ---------------------------------------------------

def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """JSON-able tree with tensors replaced by ``{"__tensor__": key}`` (dict keys keep their type)."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "t"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: no shared storage in safetensors
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten_state(v, tensors, f"{prefix}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    assert obj is None or isinstance(obj, (bool, int, float, str)), type(obj)
    return obj


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# -- RNG states (per rank) -----------------------------------------------------------------------

def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]),
                                                              int(np_state[3]), float(np_state[4])]}
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


# -- model files shared with the registry ---------------------------------------------------------

def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(path: Path, model: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Weights as safetensors (atomic); ``metadata`` values must be strings."""
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(model_tensors(model), str(tmp), metadata=metadata or {})


def load_model(path: Path, model: torch.nn.Module) -> None:
    model.load_state_dict(load_file(str(path)))


# -- the manager ----------------------------------------------------------------------------------

class CheckpointError(RuntimeError):
    pass


def step_dirs(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, name) of the complete checkpoint directories, newest first."""
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p.name))
    return sorted(out, reverse=True)


def write_sums(path: Path) -> None:
    """The integrity record: ``SHA256SUMS`` (sha256sum's format) of every file in ``path``."""
    lines = [f"{sha256_file(f)}  {f.name}\n" for f in sorted(path.iterdir()) if f.name != SUMS]
    atomic_write_text(path / SUMS, "".join(lines))


def read_sums(path: Path) -> dict[str, str] | None:
    """name -> sha256 from ``SHA256SUMS``; None when there is none (an older checkpoint)."""
    f = path / SUMS
    if not f.is_file():
        return None
    out = {}
    for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"{f}: line {n} is not '<sha256>  <file>'")
        out[name] = digest
    return out


def _check(path: Path, listed: dict[str, str]) -> str | None:
    for name, digest in listed.items():
        f = path / name
        if not f.is_file():
            return f"{f}: missing"
        if sha256_file(f) != digest:
            return f"{f}: checksum mismatch (truncated or modified)"
    return None


def verify(path: Path) -> tuple[dict | None, str | None]:
    """(meta, None) when every file matches the checkpoint's integrity record; (None, why) otherwise.

    ``SHA256SUMS`` covers every file, ``meta.json`` included; a checkpoint without it (written by an
    older version) is checked against ``meta.json``'s own list and accepted with a warning.
    """
    try:
        sums = read_sums(path)
    except ValueError as e:
        return None, str(e)
    if sums is not None:
        if "meta.json" not in sums:
            return None, f"{path / SUMS}: does not list meta.json"
        unlisted = sorted(p.name for p in path.iterdir() if p.name != SUMS and p.name not in sums)
        if unlisted:
            return None, f"{path / unlisted[0]}: not in {SUMS} (added after the checkpoint was written)"
        why = _check(path, sums)
        if why is not None:
            return None, why
    try:
        meta = read_json(path / "meta.json")
    except ValueError as e:
        return None, str(e)
    why = _check(path, meta.get("files", {}))
    if why is not None:
        return None, why
    if sums is None:
        log.warning("checkpoint %s has no %s (written by an older version): meta.json itself is not "
                    "verified, only the files it lists", path, SUMS)
    return meta, None


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on directory ``path``; None when another process holds it
    (or the file system cannot tell: then nothing is assumed dead)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            log.warning("cannot lock %s (%s): leaving it", path, e)
        os.close(fd)
        return None


def remove_partial(ckpt_dir: Path) -> list[str]:
    """Remove the partial checkpoint directories crashed writers left (``.step-*.tmp``, ``.stale-*``);
    one a live writer holds (it flocks its temporary directory while writing) is left alone."""
    removed = []
    if not ckpt_dir.is_dir():
        return removed
    for p in sorted(ckpt_dir.iterdir()):
        if not (_PARTIAL_RE.match(p.name) and p.is_dir() and not p.is_symlink()):
            continue
        fd = _try_lock(p)
        if fd is None:
            log.info("partial checkpoint %s is being written by a live process: left alone", p.name)
            continue
        try:
            shutil.rmtree(p)
            removed.append(p.name)
        except OSError as e:
            log.warning("cannot remove partial checkpoint %s: %s", p, e)
        finally:
            os.close(fd)
    if removed:
        log.warning("removed %d partial checkpoint(s) left by crashed runs: %s", len(removed), ", ".join(removed))
    return removed


class Checkpoints:
    def __init__(self, ckpt_dir: Path, comm, keep: int = 3):
        self.dir = Path(ckpt_dir)
        self.comm = comm
        self.keep = keep

    def _rank_files(self, tmp: Path, rank_state: dict) -> dict[str, str]:
        r = self.comm.rank
        meta, tensors = rng_state()
        st, js = tmp / f"rank-{r:05d}.safetensors", tmp / f"rank-{r:05d}.json"
        save_file(tensors, str(st))
        js.write_text(json.dumps({"rng": meta, "state": rank_state}, default=_jsonable))
        return {st.name: sha256_file(st), js.name: sha256_file(js)}

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             shared: dict, rank_state: dict) -> Path:
        """Collective: every rank calls it at the same step."""
        name = f"step-{step:09d}"
        final = self.dir / name
        if self.comm.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            stale = None
            if final.exists():  # left by a run that crashed before moving `latest` past it
                stale = final.with_name(f".stale-{name}-{os.getpid()}")
                os.rename(final, stale)
            with contextlib.ExitStack() as lock, atomic_dir(final) as tmp:
                # The lock tells remove_partial we are alive; held until after the rename.
                lock.enter_context(_held(tmp))
                self.comm.broadcast_object(str(tmp))
                files = self._rank_files(tmp, rank_state)
                for other in self.comm.allgather_object(files)[1:]:
                    files.update(other)
                save_file(model_tensors(model), str(tmp / "model.safetensors"))
                opt_tensors: dict[str, torch.Tensor] = {}
                opt_tree = flatten_state(optimizer.state_dict(), opt_tensors)
                save_file(opt_tensors, str(tmp / "optim.safetensors"))
                for f in ("model.safetensors", "optim.safetensors"):
                    files[f] = sha256_file(tmp / f)
                atomic_write_json(tmp / "meta.json", {"step": step, "world_size": self.comm.size,
                                                      "shared": shared, "optimizer": opt_tree,
                                                      "files": files})
                write_sums(tmp)  # last: covers every file, meta.json included
            atomic_write_text(self.dir / LATEST, name + "\n")
            if stale is not None:
                shutil.rmtree(stale, ignore_errors=True)
            self._prune(name)
        else:
            tmp = Path(self.comm.broadcast_object(None))
            self.comm.allgather_object(self._rank_files(tmp, rank_state))
        self.comm.barrier()  # nobody reads or resumes before the rename and `latest` are done
        return final

    def _prune(self, newest: str) -> None:
        for _, name in step_dirs(self.dir)[self.keep:]:
            if name != newest:
                shutil.rmtree(self.dir / name, ignore_errors=True)

    def _candidates(self) -> list[str]:
        names = [n for _, n in step_dirs(self.dir)]
        pointer = self.dir / LATEST
        if pointer.is_file():
            target = pointer.read_text().strip()
            if target in names:  # newest the pointer vouches for first, then older ones
                names = [target] + [n for s, n in step_dirs(self.dir) if n != target and
                                    s < int(_STEP_RE.match(target).group(1))]
            else:
                log.warning("checkpoint pointer %s names %r, which does not exist; "
                            "trying the others", pointer, target)
        return names

    def choose(self, explicit: Path | None = None) -> Path | None:
        """Collective: the newest loadable checkpoint (rank 0 decides), or None."""
        choice = None
        if self.comm.rank == 0:
            cands = [Path(explicit)] if explicit is not None else [self.dir / n for n in self._candidates()]
            for path in cands:
                meta, why = verify(path)
                if meta is None:
                    log.error("checkpoint %s cannot be used: %s; trying the previous one", path.name, why)
                    continue
                if meta["world_size"] != self.comm.size:
                    choice = {"error": f"checkpoint {path} was written by {meta['world_size']} ranks; "
                              f"this job has {self.comm.size}: exact resume needs the same world size"}
                    break
                choice = {"path": str(path)}
                break
            if explicit is not None and choice is None:
                choice = {"error": f"checkpoint {explicit} is damaged (see the log above)"}
            remove_partial(self.dir)  # after the choice: a partial one is never a candidate
        choice = self.comm.broadcast_object(choice)
        if choice is None:
            return None
        if "error" in choice:
            raise AllRanksError(choice["error"])
        return Path(choice["path"])

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Restore model, optimizer and this rank's RNG; returns (shared state, this rank's state)."""
        meta = read_json(path / "meta.json")
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        opt_tensors = load_file(str(path / "optim.safetensors"))
        load_optimizer_state(optimizer, unflatten_state(meta["optimizer"], opt_tensors), path)
        r = self.comm.rank
        mine = read_json(path / f"rank-{r:05d}.json")
        set_rng_state(mine["rng"], load_file(str(path / f"rank-{r:05d}.safetensors")))
        return meta["shared"], mine["state"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, path: Path) -> None:
    """The checkpoint's optimizer state (moments, step counts) with the hyper-parameters of the
    optimizer as built from the config; a saved hyper-parameter that differs is named in a warning."""
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for i, (group, want) in enumerate(zip(optimizer.param_groups, configured)):
        for k, v in want.items():
            if k != "lr" and k in group and _plain(group[k]) != _plain(v):  # lr: the schedule sets it every step
                log.warning("checkpoint %s: optimizer group %d %s=%r differs from the config's %r; "
                            "using the config's", path, i, k, group[k], v)
            group[k] = v


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v  # JSON keeps betas=(0.9, 0.999) as a list


@contextlib.contextmanager
def _held(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # a file system without flock: remove_partial will not remove what it cannot lock
    try:
        yield
    finally:
        os.close(fd)


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON-serializable in a checkpoint: {type(o).__name__}")
