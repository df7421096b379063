"""The model registry: versioned, checksummed safetensors artifacts in a directory tree.

Layout (a directory on the shared filesystem; ``./registry`` unless ``HPC_REGISTRY`` or an
explicit root says otherwise)::

    ROOT/NAME/<version>/model.safetensors   weights (never pickle)
                        model.json          the model card (family, config, schema, stats, lineage)
                        SHA256SUMS          `sha256sum -c` format, over every other file
    ROOT/NAME/aliases/<alias>.json          {"version": v, ...}; replaced atomically
    ROOT/NAME/aliases.log                   one JSON line per promotion (append-only)

A version directory is built complete under a hidden staging name and renamed onto
``NAME/<v>``; rename of a directory onto an existing non-empty one fails, so two concurrent
registrations cannot both take ``v``: the loser retries with ``v+1`` (no lock file needed, and no
reader ever sees a half-written version). A version's number is its directory name, so it is not
stored in model.json (it is only known after the rename); ``card["version"]`` is filled in on read.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save as save_safetensors

from hpc.dist.world import world_from_env
from hpc.registry.card import card_from_run, ensemble_card
from hpc.registry.layout import (ALIAS_RE, CARD, META, NAME_RE, SOURCES, SUMS, WEIGHTS, IntegrityError, Ref,
                                 default_root, format_sums, parse_ref, read_verified, verify_dir)
from hpc.registry.scorers import build_model_from_card, build_scorer
from hpc.util.io import atomic_dir, atomic_write_json, fsync_dir, read_json, sha256_bytes, sha256_file
from hpc.util.versions import code_version, user, versions

# A version that lost the rename race this many times in a row means something else is wrong.
_MAX_RENAME_TRIES = 1000

# A staging directory older than this was left by a registration that crashed (a live one renames
# its staging directory within the time it takes to copy the weights).
STALE_STAGING_S = 24 * 3600


def _remove_stale_staging(ndir: Path) -> None:
    now = time.time()
    for p in ndir.glob(".*staged-*"):  # also atomic_dir's own temporary "..staged-*.tmp"
        try:
            if now - p.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:
            continue


class Registry:
    """A registry rooted at ``root`` (default: ``$HPC_REGISTRY`` or ``./registry``)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    # ---------------------------------------------------------------- paths and lookups
    def _name_dir(self, name: str) -> Path:
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"model name {name!r} must match {NAME_RE.pattern}")
        return self.root / name

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name)
                      and not p.name.startswith("."))

    def versions(self, name: str) -> list[int]:
        d = self._name_dir(name)
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())

    def aliases(self, name: str) -> dict[str, int]:
        d = self._name_dir(name) / "aliases"
        if not d.is_dir():
            return {}
        out = {}
        for p in sorted(d.glob("*.json")):
            out[p.stem] = int(read_json(p)["version"])
        return out

    def version_dir(self, ref: Ref) -> Path:
        return self._name_dir(ref.name) / str(ref.version)

    def resolve(self, ref: str) -> Ref:
        """``NAME@ALIAS`` / ``NAME@VERSION`` / ``NAME`` (the latest version) -> a concrete Ref."""
        name, sel = parse_ref(ref)
        have = self.versions(name)
        if not have:
            known = ", ".join(self.names()) or "none"
            raise ValueError(f"{self.root}: no model named {name!r} (registered: {known})")
        if sel is None:
            return Ref(name, have[-1])
        if sel.isdigit():
            if int(sel) not in have:
                raise ValueError(f"{name}@{sel}: no such version in {self.root} (versions: "
                                 f"{', '.join(map(str, have))})")
            return Ref(name, int(sel))
        aliases = self.aliases(name)
        if sel not in aliases:
            raise ValueError(f"{name}@{sel}: no such alias (aliases: "
                             f"{', '.join(f'{a}->{v}' for a, v in aliases.items()) or 'none'}; "
                             f"versions: {', '.join(map(str, have))})")
        return Ref(name, aliases[sel])

    def is_promoted(self, ref: Ref) -> bool:
        return ref.version in self.aliases(ref.name).values()

    # ---------------------------------------------------------------- reading
    def verify(self, ref: str | Ref) -> Ref:
        """Recompute every checksum of a version (and of an ensemble's members); raise on any problem."""
        r = self.resolve(ref) if isinstance(ref, str) else ref
        problems = verify_dir(self.version_dir(r))
        if problems:
            raise IntegrityError(f"{r.name}@{r.version} failed verification: " + "; ".join(problems))
        return r

    def card(self, ref: str | Ref, verified: bool = True) -> dict:
        """The model card (model.json) of a version, with ``name`` and ``version`` filled in."""
        r = self.verify(ref) if verified else (self.resolve(ref) if isinstance(ref, str) else ref)
        vdir = self.version_dir(r)
        data = read_verified(vdir, CARD) if verified else (vdir / CARD).read_bytes()
        try:
            card = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{vdir / CARD}: not valid JSON ({e})") from None
        card["name"], card["version"] = r.name, r.version
        card["aliases"] = sorted(a for a, v in self.aliases(r.name).items() if v == r.version)
        card["sha256"] = sha256_bytes(data)
        return card

    def list(self, name: str | None = None) -> list[dict]:
        """One row per version (of ``name``, or of every model): version, aliases, metrics, time."""
        rows = []
        for n in [name] if name else self.names():
            aliases = self.aliases(n)
            for v in self.versions(n):
                try:
                    card = read_json(self.version_dir(Ref(n, v)) / CARD)
                except ValueError:
                    card = {}
                rows.append({"name": n, "version": v, "kind": card.get("kind", "?"),
                             "family": (card.get("model") or {}).get("family", ""),
                             "aliases": sorted(a for a, av in aliases.items() if av == v),
                             "metrics": card.get("metrics") or {},
                             "time": (card.get("registered") or {}).get("time", "")})
        return rows

    # ---------------------------------------------------------------- writing
    def add(self, run_dir: str | os.PathLike, name: str, source: str = "best") -> int:
        """Register ``run_dir/models/<source>.safetensors`` with its card; return the new version."""
        if source not in SOURCES:
            raise ValueError(f"source {source!r} is not one of {', '.join(SOURCES)}")
        self._name_dir(name)
        card, weights = card_from_run(Path(run_dir), source)
        return self._publish(name, card, {WEIGHTS: weights})

    def add_ensemble(self, name: str, members: list[str], method: str = "mean",
                     weights: list[float] | None = None, groups: list[list[int]] | None = None,
                     meta: Any = None, metrics: dict | None = None, lineage: dict | None = None) -> int:
        """Register an ensemble of member references, pinned to their current verified versions.

        ``method``: mean | vote | weighted | stacking (``hpc.models.combine``); ``meta`` is the
        stacking meta-model (``hpc.models.combine.MetaModel``), stored as meta.safetensors.
        """
        self._name_dir(name)
        cards = [self.card(m) for m in members]
        files: dict[str, Path | bytes] = {}
        meta_config = None
        if meta is not None:
            meta_config = meta.config()
            files[META] = save_safetensors({k: v.detach().cpu().contiguous()
                                            for k, v in meta.state_dict().items()})
        card = ensemble_card(cards, method, weights, groups, meta_config, metrics, lineage)
        return self._publish(name, card, files)

    def _publish(self, name: str, card: dict, files: dict[str, Path | bytes]) -> int:
        card = dict(card, registered={
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "user": user(), "host": socket.gethostname(),
            "slurm_job_id": world_from_env().slurm_job_id, "code_version": code_version(),
            "versions": versions()})
        ndir = self._name_dir(name)
        ndir.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(ndir)
        # Stage a complete, fsynced directory under a hidden name first (atomic_dir), then race
        # for the version number with a second rename: a crash leaves only a hidden directory.
        staged = ndir / f".staged-{os.getpid()}-{time.monotonic_ns()}"
        with atomic_dir(staged) as tmp:
            files = dict(files, **{CARD: (json.dumps(card, indent=2, sort_keys=True, default=str)
                                          + "\n").encode()})
            for fname, src in files.items():
                if isinstance(src, bytes):
                    (tmp / fname).write_bytes(src)
                else:
                    shutil.copyfile(src, tmp / fname)
            (tmp / SUMS).write_text(format_sums({f: sha256_file(tmp / f) for f in files}), encoding="utf-8")
        v = (self.versions(name) or [0])[-1] + 1
        for _ in range(_MAX_RENAME_TRIES):
            try:
                os.rename(staged, ndir / str(v))
                fsync_dir(ndir)
                return v
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    shutil.rmtree(staged, ignore_errors=True)
                    raise
                v = max(v + 1, (self.versions(name) or [0])[-1] + 1)
        shutil.rmtree(staged, ignore_errors=True)
        raise RuntimeError(f"{ndir}: could not claim a version number after {_MAX_RENAME_TRIES} tries")

    def promote(self, name: str, version: int | str, alias: str) -> int | None:
        """Point ``alias`` at ``version`` (verified first); return the previous version or None."""
        if not ALIAS_RE.fullmatch(alias) or alias == "latest":
            raise ValueError(f"alias {alias!r} must match {ALIAS_RE.pattern}, not be all digits "
                             "and not be 'latest' (e.g. production, staging)")
        r = self.verify(f"{name}@{int(version)}" if str(version).isdigit() else f"{name}@{version}")
        previous = self.aliases(name).get(alias)
        entry = {"alias": alias, "version": r.version, "previous": previous,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "user": user(),
                 "host": socket.gethostname(), "slurm_job_id": world_from_env().slurm_job_id}
        ndir = self._name_dir(name)
        atomic_write_json(ndir / "aliases" / f"{alias}.json", entry)
        # O_APPEND writes of one short line land whole and in order on local filesystems (and
        # NFS with a single writer per line); the alias file above is the source of truth.
        fd = os.open(ndir / "aliases.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return previous

    def alias_log(self, name: str) -> list[dict]:
        p = self._name_dir(name) / "aliases.log"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

    # ---------------------------------------------------------------- loading
    def _loadable_card(self, ref: str, allow_unpromoted: bool) -> dict:
        r = self.resolve(ref)
        sel = parse_ref(ref)[1]
        via_alias = sel is not None and not sel.isdigit()  # resolve read the alias once: promoted then
        if not allow_unpromoted and not via_alias and not self.is_promoted(r):
            raise ValueError(f"{ref} resolves to {r.name}@{r.version}, which no alias points to; "
                             f"promote it (`hpc registry promote {r.name} {r.version} --alias staging`) "
                             "or pass --allow-unpromoted")
        return self.card(r)

    def load(self, ref: str, allow_unpromoted: bool = False, device: str = "cpu") -> tuple[Any, dict]:
        """Verify, then build from safetensors + JSON only: ``(nn.Module in eval mode, card)``.

        A single model comes back as the family's plain module (normalized inputs, raw outputs);
        an ensemble as ``hpc.registry.scorers.Ensemble`` (raw batches through ``prepare``).
        Only versions an alias points to load unless ``allow_unpromoted``; an ensemble's members
        are pinned versions (they need no alias) and must still match their recorded model.json.
        """
        card = self._loadable_card(ref, allow_unpromoted)
        if card.get("kind") == "ensemble":
            return build_scorer(self, card, device), card
        return build_model_from_card(self, card, device), card

    def load_scorer(self, ref: str, allow_unpromoted: bool = False, device: str = "cpu") -> tuple[Any, dict]:
        """Like ``load`` but always a scorer (``Single`` or ``Ensemble``): what batch inference runs."""
        card = self._loadable_card(ref, allow_unpromoted)
        return build_scorer(self, card, device), card
