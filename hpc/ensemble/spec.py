"""``ensemble.yaml``: a base training config, the method and its parameters, per-member overrides.

    name: digits-bag                 # registry name of the ensemble; member i is NAME-m<i>
    base: ensemble_digits_base.yaml  # a training config: a path (relative to this file) or shipped name
    overrides: [train.epochs=2]      # dotted overrides applied to every member
    method: bagging                  # bagging | boosting | stacking
    seed: 0                          # member i trains with seed + i (init, order, bootstrap)
    bagging: {members: 5, combine: mean, bootstrap: true}
    boosting: {rounds: 5, shrinkage: 1.0}
    stacking: {folds: 5, meta: {kind: softmax, epochs: 300, lr: 0.05}}
    members:                         # optional; bagging/boosting: one entry per member/round
      - {overrides: [model.config.hidden=32]}     # stacking: one entry per level-0 model
    registry: {root: null, alias: null}          # alias: promoted on the ensemble entry

Only the section of the chosen method may be given. ``load_spec`` validates everything (and the
base config with every member's overrides, through the trainer's own loader) before any member
trains, so a typo fails in a second rather than after the third member.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hpc.util.names import check_name
from hpc.util.typed import from_dict, read_yaml_mapping, require

METHODS = ("bagging", "boosting", "stacking")


@dataclass
class BaggingParams:
    members: int = 5
    combine: Literal["mean", "vote"] = "mean"
    bootstrap: bool = True              # false: members differ only by seed / overrides

    def check(self, where: str) -> None:
        require(self.members >= 2, f"{where}.members", f"must be >= 2, got {self.members}")


@dataclass
class BoostingParams:
    rounds: int = 5
    shrinkage: float = 1.0              # regression/ratings: weight of rounds >= 1

    def check(self, where: str) -> None:
        require(self.rounds >= 2, f"{where}.rounds", f"must be >= 2, got {self.rounds}")
        require(0 < self.shrinkage <= 1, f"{where}.shrinkage", f"must be in (0, 1], got {self.shrinkage}")


@dataclass
class MetaParams:
    kind: Literal["softmax", "linear", "mlp"] = "softmax"   # softmax for classes, linear for ratings
    epochs: int = 300                   # full-batch steps on the out-of-fold table
    lr: float = 0.05
    weight_decay: float = 1e-3
    hidden: int = 32                    # mlp only

    def check(self, where: str) -> None:
        require(self.epochs >= 1, f"{where}.epochs", "must be >= 1")
        require(self.lr > 0, f"{where}.lr", "must be > 0")
        require(self.hidden >= 1, f"{where}.hidden", "must be >= 1")


@dataclass
class StackingParams:
    folds: int = 5
    meta: MetaParams = field(default_factory=MetaParams)

    def check(self, where: str) -> None:
        require(self.folds >= 2, f"{where}.folds", f"must be >= 2, got {self.folds}")


@dataclass
class MemberSpec:
    overrides: list[str] = field(default_factory=list)


@dataclass
class RegistryParams:
    root: str | None = None             # default: $HPC_REGISTRY or ./registry
    alias: str | None = None


@dataclass
class EnsembleSpec:
    name: str = ""
    base: str = ""
    method: Literal["bagging", "boosting", "stacking"] = "bagging"
    overrides: list[str] = field(default_factory=list)
    seed: int = 0
    bagging: BaggingParams | None = None     # None: the method's defaults (set by check)
    boosting: BoostingParams | None = None
    stacking: StackingParams | None = None
    members: list[MemberSpec] = field(default_factory=list)
    registry: RegistryParams = field(default_factory=RegistryParams)
    path: str | None = None             # the file it was read from (set by load_spec)

    def check(self, where: str) -> None:
        check_name(self.name, f"{where}.name")
        require(bool(self.base), f"{where}.base", "is required: the training config every member starts from")
        for other in METHODS:
            require(other == self.method or getattr(self, other) is None, f"{where}.{other}",
                    f"is given but method is {self.method}; remove it or set method: {other}")
        if getattr(self, self.method) is None:
            cls = {"bagging": BaggingParams, "boosting": BoostingParams, "stacking": StackingParams}[self.method]
            setattr(self, self.method, from_dict(cls, None, f"{where}.{self.method}"))
        n = self.size
        if self.method != "stacking":
            require(len(self.members) in (0, n), f"{where}.members",
                    f"has {len(self.members)} entries; give none or one per member ({n})")

    @property
    def params(self):
        return getattr(self, self.method)

    @property
    def size(self) -> int:
        """Members (bagging), rounds (boosting), or level-0 models (stacking, each x folds)."""
        if self.method == "bagging":
            return self.bagging.members
        if self.method == "boosting":
            return self.boosting.rounds
        return max(1, len(self.members))

    def member_overrides(self, i: int) -> list[str]:
        """Overrides from the spec for member/round/level-0 model ``i`` (base ones first)."""
        own = self.members[i].overrides if i < len(self.members) else []
        return list(self.overrides) + list(own)

    def base_path(self) -> str:
        p = Path(self.base)
        if not p.is_absolute() and self.path is not None and (Path(self.path).parent / p).is_file():
            return str(Path(self.path).parent / p)
        return self.base


def load_spec(source: str | Path | dict) -> EnsembleSpec:
    """Read and validate an ensemble spec (file or mapping); ValueError names the file and key."""
    where, path = "ensemble", None
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{path}: ensemble spec not found")
        where = str(path)
        data = dict(read_yaml_mapping(path), path=str(path.resolve()))
    try:
        return from_dict(EnsembleSpec, data, "ensemble")
    except ValueError as e:
        raise ValueError(f"{where}: {e}" if path else str(e)) from None
