"""`hpc ensemble train`: the driver that trains an ensemble's members one after another,
registers them and combines them.

Every member is an ordinary training run of the base config with its own overrides, seed and
row-keyed sample weights / targets (``hpc.data.rowhooks``), run with a deterministic run id
``ens-<config hash>`` and registered as ``NAME-m<i>`` (bagging), ``NAME-r<k>`` (boosting) or
``NAME-l<m>f<j>`` (stacking). A rerun finds a registered version whose run directory carries the
same id and skips the training (boosting still re-predicts the training split to rebuild the
weights, which is cheap next to training). Files the members read (SAMME weights, residual
targets) are named by their content hash, so a changed earlier round changes the later rounds'
config hash and forces them to retrain.

Work files live in ``<out_dir>/<NAME>/ensemble/``: the weight/target arrays, ``ensemble.json``
(members, method, weights, groups, meta-model, metrics of every member and of the ensemble on val
and test) and ``meta.safetensors`` (stacking).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save

from hpc.data.manifest import load_manifest
from hpc.data.reader import iter_shard
from hpc.data.sampling import fold_of
from hpc.ensemble.boosting import residual_round_weight, residual_targets, samme_round
from hpc.ensemble.member import train_member
from hpc.ensemble.spec import EnsembleSpec
from hpc.ensemble.stacking import OOFTable
from hpc.models.combine import combine, fit_meta, stacking_features
from hpc.registry.layout import META
from hpc.train.config import load_config
from hpc.train.inputs import TARGET, split_dirs
from hpc.train.preempt import EXIT_PREEMPTED
from hpc.util.io import atomic_write_bytes, atomic_write_json


@dataclass
class Member:
    name: str           # registry name
    ref: str | None     # NAME@VERSION (None on ranks > 0 of a multi-rank Slurm member: rank 0 registers)
    run_id: str
    trained: bool       # False: found registered, skipped


@dataclass
class Result:
    method: str
    task: str
    members: list[Member]
    weights: list[float] | None = None
    groups: list[list[int]] | None = None
    meta: dict | None = None
    metrics: dict = field(default_factory=dict)   # split -> {"members": {ref: m}, "ensemble": m}
    ensemble_ref: str | None = None
    work_dir: Path | None = None


def _hook(sample_weights: dict | None = None, targets_from: str | None = None) -> dict:
    return {"sample_weights": sample_weights, "targets_from": targets_from}


class Runner:
    def __init__(self, spec: EnsembleSpec, registry, nproc: int = 1, log: Callable[[str], None] = print,
                 rank: int = 0):
        """``nproc``: local ranks each member trains on (launched here). ``rank``: this process's
        rank when the Runner itself runs once per rank (a multi-task Slurm member task)."""
        self.spec, self.registry, self.nproc, self.log, self.rank = spec, registry, nproc, log, rank
        self.base = spec.base_path()
        cfg = load_config(self.base, spec.overrides)  # validates the base config now
        self.base_config = cfg
        # data.train|val|test or data.dir/<split>, resolved as the trainer does
        self.splits = split_dirs(cfg.data)
        self.work = Path(cfg.out_dir) / spec.name / "ensemble"
        self.train_manifest = load_manifest(self.splits["train"])
        self.task = self.train_manifest.task
        self.n = self.train_manifest.total_samples
        self.y = self._targets(self.splits["train"])
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    # ------------------------------------------------------------------ members
    def member(self, name: str, index: int, hook: dict, source: str = "best") -> Member:
        """Train (or find registered) one member: base + spec overrides + the row hook; register it.

        ``hook`` = {"sample_weights": spec | None, "targets_from": path | None} (hpc.data.rowhooks).
        """
        overrides = self.spec.member_overrides(index) + [f"seed={self.spec.seed + index}"]
        if hook["sample_weights"] and self.task == "classification":
            # remainder=pad: every row of the member's bootstrap/fold sample is seen each epoch
            # (drop would lose the tail); the trainer weights the loss whenever sample_weights is
            # set. Cost: one padded batch per epoch.
            overrides.append("data.remainder=pad")
        cfg = load_config(self.base, overrides)  # every member validated before it costs anything
        key = cfg.hash() + json.dumps(hook, sort_keys=True, default=str)
        run_id = f"ens-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        found = self._registered(name, run_id)
        if found:
            self.log(f"{name}: registered as {found} (run {run_id}); skipping")
            return Member(name, found, run_id, False)
        overrides += [f"name={name}", f"run_id={run_id}", "resume=auto", "registry=null"]
        self.log(f"{name}: training (run {run_id})")
        summary = train_member(self.base, overrides, hook, self.nproc)
        state = (summary or {}).get("state", "completed")  # None: launched ranks exited 0
        if state == "preempted":
            # Checkpointed (and requeued under Slurm): the requeued job (or a rerun) resumes this
            # run through its fixed run id; never register a half-trained member.
            self.log(f"{name}: preempted; rerun (or the requeued job) resumes run {run_id}")
            raise SystemExit(EXIT_PREEMPTED)
        if state != "completed":
            raise RuntimeError(f"{name}: training run {run_id} ended {state}; not registered")
        if self.rank != 0:
            return Member(name, None, run_id, True)  # rank 0 registers; the other ranks are done
        run_dir = Path(cfg.out_dir) / name / run_id
        version = self.registry.add(run_dir, name, source=source)
        return Member(name, f"{name}@{version}", run_id, True)

    def _registered(self, name: str, run_id: str) -> str | None:
        for v in reversed(self.registry.versions(name)):
            card = self.registry.card(f"{name}@{v}")
            if Path((card.get("lineage") or {}).get("run_dir") or "").name == run_id:
                return f"{name}@{v}"
        return None

    def _row_file(self, kind: str, values: np.ndarray) -> Path:
        """Write a per-row array named by its content hash (so it is part of the config hash)."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(values, dtype=np.float32), allow_pickle=False)
        data = buf.getvalue()
        path = self.work / f"{kind}-{hashlib.sha256(data).hexdigest()[:16]}.npy"
        if not path.is_file():
            atomic_write_bytes(path, data)
        return path.resolve()

    # ------------------------------------------------------------------ predictions
    def _targets(self, split: Path) -> np.ndarray:
        m = load_manifest(split)
        f = TARGET[m.task]
        return np.concatenate([b[f].numpy() for s in range(len(m.shards))
                               for b in iter_shard(m, s, 4096, normalize=False)])

    def predict(self, ref: str, split: str) -> np.ndarray:
        """A member's outputs (probabilities [N, C] or predictions [N]) on a split, in row order."""
        key = (ref, split)
        if key not in self._cache:
            # batch inference's scorer: the card's normalization, then probabilities/predictions
            scorer, _card = self.registry.load_scorer(ref, allow_unpromoted=True)
            m = load_manifest(self.splits[split])
            outs = []
            with torch.no_grad():
                for s in range(len(m.shards)):
                    for b in iter_shard(m, s, 4096, normalize=False):
                        outs.append(scorer(scorer.prepare(b)).numpy())
            self._cache[key] = np.concatenate(outs)
        return self._cache[key]

    def score(self, out: np.ndarray, y: np.ndarray) -> dict:
        if self.task == "classification":
            return {"accuracy": float((out.argmax(1) == y).mean())}
        return {"rmse": float(np.sqrt(np.mean((out.reshape(-1) - y) ** 2)))}

    # ------------------------------------------------------------------ methods
    def run(self) -> Result:
        self.work.mkdir(parents=True, exist_ok=True)
        res = getattr(self, f"_{self.spec.method}")()
        res.work_dir = self.work
        self._evaluate(res)
        self._register(res)
        self._save(res)
        return res

    def _register(self, res: Result) -> None:
        """The ensemble's own registry entry (members pinned, weights, groups, meta-model)."""
        name, refs = self.spec.name, [m.ref for m in res.members]
        method = self.method_of(res)
        have = self.registry.versions(name)
        if have:
            ens = self.registry.card(f"{name}@{have[-1]}").get("ensemble") or {}
            if (ens.get("method"), ens.get("members"), ens.get("weights"), ens.get("groups")) == \
                    (method, refs, res.weights, res.groups) and self._same_meta(f"{name}@{have[-1]}"):
                res.ensemble_ref = f"{name}@{have[-1]}"
                self.log(f"{name}: registered as {res.ensemble_ref} with these members; skipping")
                return
        v = self.registry.add_ensemble(name, refs, method, weights=res.weights, groups=res.groups,
                                       meta=getattr(self, "_meta_model", None), metrics=res.metrics,
                                       lineage={"spec": self.spec.path, "method": res.method,
                                                "work_dir": str(self.work.resolve())})
        res.ensemble_ref = f"{name}@{v}"
        if self.spec.registry.alias:
            self.registry.promote(name, v, self.spec.registry.alias)
        self.log(f"{name}: registered ensemble {res.ensemble_ref} ({len(refs)} members, {method})")

    def _same_meta(self, ref: str) -> bool:
        """Does the registered entry hold this run's meta-model (tensor for tensor)?"""
        meta = getattr(self, "_meta_model", None)
        if meta is None:
            return True
        path = self.registry.version_dir(self.registry.resolve(ref)) / META
        if not path.is_file():
            return False
        old = load_file(str(path))
        new = meta.state_dict()
        return old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in new)

    def _bagging(self) -> Result:
        p = self.spec.bagging
        members = []
        for i in range(p.members):
            members.append(self.bagging_member(i))
        return Result("bagging", self.task, members, weights=None)

    def bagging_member(self, i: int) -> Member:
        p = self.spec.bagging
        weights = {"kind": "bootstrap", "seed": self.spec.seed + i} if p.bootstrap else None
        return self.member(f"{self.spec.name}-m{i}", i, _hook(weights))

    def stacking_member(self, level: int, fold: int) -> Member:
        p = self.spec.stacking
        spec = {"kind": "holdout", "seed": self.spec.seed, "folds": p.folds, "fold": fold}
        return self.member(f"{self.spec.name}-l{level}f{fold}", level, _hook(spec))

    # ------------------------------------------------------------------ one Slurm task each
    def parallel_tasks(self) -> int | None:
        """How many members can train at once (one job array task each); None: sequential rounds."""
        if self.spec.method == "bagging":
            return self.spec.bagging.members
        if self.spec.method == "stacking":
            return self.spec.size * self.spec.stacking.folds
        return None

    def train_task(self, index: int) -> str:
        """Train array task / chain link ``index`` (registering it); returns the member's ref.

        Bagging: member ``index``; stacking: level-0 model ``index // folds`` on fold
        ``index % folds``; boosting: round ``index`` (rounds before it must be registered: they
        are found and skipped, and their predictions rebuild this round's weights or targets).
        """
        self.work.mkdir(parents=True, exist_ok=True)
        if self.spec.method == "bagging":
            return self.bagging_member(index).ref
        if self.spec.method == "stacking":
            return self.stacking_member(*divmod(index, self.spec.stacking.folds)).ref
        res = self._boosting(upto=index + 1)
        return res.members[-1].ref

    def _boosting(self, upto: int | None = None) -> Result:
        p = self.spec.boosting
        rounds = p.rounds if upto is None else min(upto, p.rounds)
        members, weights = [], []
        if self.task == "classification":
            w = np.ones(self.n)
            k_classes = int(self.train_manifest.num_classes or int(self.y.max()) + 1)
            for k in range(rounds):
                path = self._row_file("samme", w)
                m = self.member(f"{self.spec.name}-r{k}", k, _hook({"kind": "file", "path": str(path)}))
                if m.ref is None:
                    return Result("boosting", self.task, members + [m], weights=weights)
                r = samme_round(self.y, self.predict(m.ref, "train").argmax(1), w, k_classes)
                self.log(f"{m.ref}: weighted error {r.err:.4f}, alpha {r.alpha:.4f}")
                if r.alpha <= 0:
                    self.log(f"{m.ref}: discarded ({r.reason}); boosting stops at {len(members)} rounds")
                    break
                members.append(m)
                weights.append(r.alpha)
                w = r.weights
                if r.stop:
                    self.log(f"boosting stops after round {k}: {r.reason}")
                    break
            if not members:
                raise ValueError(f"{self.spec.path}: boosting round 0 is no better than chance; "
                                 "nothing to combine (train the base config longer)")
            return Result("boosting", self.task, members, weights=weights)
        f = np.zeros(self.n)
        for k in range(rounds):
            path = self._row_file("residual", residual_targets(self.y, f if k else None))
            # residual rounds are judged on residuals, which the val split does not hold: keep the
            # last weights, not the "best" by a val metric computed against the raw targets
            m = self.member(f"{self.spec.name}-r{k}", k, _hook(None, str(path)),
                            source="last" if k else "best")
            if m.ref is None:
                return Result("boosting", self.task, members + [m], weights=weights)
            wk = residual_round_weight(k, p.shrinkage)
            f = f + wk * self.predict(m.ref, "train")
            self.log(f"{m.ref}: weight {wk}, train rmse {np.sqrt(np.mean((self.y - f) ** 2)):.4f}")
            members.append(m)
            weights.append(wk)
        return Result("boosting", self.task, members, weights=weights)

    def _stacking(self) -> Result:
        p = self.spec.stacking
        folds, seed = p.folds, self.spec.seed
        fold = fold_of(seed, np.arange(self.n), self.n, folds)
        members, groups, tables = [], [], []
        width = int(self.train_manifest.num_classes or 0) if self.task == "classification" else 1
        for lvl in range(self.spec.size):
            table = OOFTable(seed, self.n, folds, width)
            group = []
            for j in range(folds):
                m = self.stacking_member(lvl, j)
                rows = np.flatnonzero(fold == j)
                table.add(j, rows, self.predict(m.ref, "train")[rows])
                group.append(len(members))
                members.append(m)
            assert table.complete(), "every training row gets exactly one out-of-fold prediction"
            groups.append(group)
            tables.append(table)
        feats = stacking_features(self.task, [[torch.from_numpy(t.values)] for t in tables])
        mp = p.meta
        meta = fit_meta(feats, torch.from_numpy(self.y), self.task, mp.kind, mp.epochs, mp.lr,
                        mp.weight_decay, mp.hidden, seed, num_classes=width or None)
        atomic_write_bytes(self.work / "meta.safetensors", save(meta.state_dict()))
        self._meta_model = meta
        return Result("stacking", self.task, members, groups=groups,
                      meta=dict(meta.config(), epochs=mp.epochs, lr=mp.lr, weight_decay=mp.weight_decay,
                                features="log-probabilities" if self.task == "classification" else "predictions"))

    # ------------------------------------------------------------------ evaluation and output
    def method_of(self, res: Result) -> str:
        """The combine method (hpc.models.combine) of an ensemble trained with ``res.method``."""
        return {"bagging": self.spec.bagging.combine if self.spec.bagging else "mean",
                "boosting": "weighted", "stacking": "stacking"}[res.method]

    def combined(self, res: Result, outs: list[np.ndarray]) -> np.ndarray:
        t = [torch.from_numpy(o) for o in outs]
        return combine(self.task, self.method_of(res), t, res.weights, res.groups,
                       getattr(self, "_meta_model", None)).numpy()

    def _evaluate(self, res: Result) -> None:
        for split in ("val", "test"):
            if split not in self.splits:
                continue
            y = self._targets(self.splits[split])
            outs = [self.predict(m.ref, split) for m in res.members]
            row = {"members": {m.ref: self.score(o, y) for m, o in zip(res.members, outs)}}
            if res.groups:  # stacking: each level-0 model = the mean of its fold members
                row["level0"] = {f"{self.spec.name}-l{i}": self.score(np.mean([outs[k] for k in g], 0), y)
                                 for i, g in enumerate(res.groups)}
            row["ensemble"] = self.score(self.combined(res, outs), y)
            res.metrics[split] = row

    def _save(self, res: Result) -> None:
        atomic_write_json(self.work / "ensemble.json", {
            "name": self.spec.name, "spec": self.spec.path, "method": res.method, "task": res.task,
            "members": [m.ref for m in res.members], "weights": res.weights, "groups": res.groups,
            "meta": res.meta, "metrics": res.metrics, "registered": res.ensemble_ref,
            "combine": self.spec.bagging.combine if self.spec.bagging else None})
