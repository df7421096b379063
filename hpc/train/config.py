"""The training config: typed dataclasses read from YAML plus dotted ``key=value`` overrides.

``load_config(path_or_dict, overrides)`` returns a validated ``TrainConfig``; any unknown key,
wrong type or impossible value is a ``ValueError`` naming the file, the key and what is valid (the
CLI exits 2 before any rank starts). ``model.config`` is validated by the model family's own
dataclass (``hpc.models.families.model_config``). See docs/train.md for every key.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpc.util.names import check_name
from hpc.util.typed import (check_override_key, dump_yaml as _dump_yaml, from_dict, parse_value,
                               parsed_mapping, read_yaml_mapping, require, to_dict)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class AllRanksError(ValueError):
    """A user error every rank raises together (decided on rank 0 and broadcast): the ranks exit 2
    together instead of aborting the job."""


@dataclass
class DataConfig:
    dir: str | None = ""               # holds train/ val/ test/ split directories (the shorthand; null: none)
    # Any split directory (one with manifest.json), wherever it is: a lab's fd/ + fd-test/ as they
    # are. Each given key wins over DIR/<split>; a val/test split that is neither given nor present
    # under DIR is simply absent (no validation: the best model is the last).
    train: str | None = None
    val: str | None = None
    test: str | None = None
    batch_size: int = 64               # GLOBAL batch: split evenly over the ranks
    eval_batch_size: int = 0           # global; 0 = batch_size
    shuffle: bool = True
    shuffle_buffer_mb: float = 64.0    # the reader's bounded shuffle window per rank
    normalize: bool = True
    augment: dict | str | None = None  # the reader's Augment: {flip, crop_pad, rotate_deg, noise_std}
    prefetch: int = 2
    remainder: Literal["drop", "pad"] = "drop"   # training; evaluation always pads (zero weight)
    # Ensemble members (docs/ensembles.md): per-row weights / targets of the TRAINING split, as
    # functions of the row id, so they hold on any number of ranks and across resume.
    sample_weights: dict | None = None  # {kind: bootstrap|holdout|file, ...} (hpc.data.rowhooks)
    targets_from: str | None = None     # .npy of per-row targets (boosting on residuals)

    def check(self, where: str) -> None:
        require(bool(self.dir) or bool(self.train), f"{where}.dir",
                "is required (a directory made by `hpc data shard|synth`, holding train/ and optionally "
                "val/ test/), unless data.train names the training split directory itself")
        for split in ("train", "val", "test"):
            require(getattr(self, split) != "", f"{where}.{split}",
                    "is empty: give a split directory (one with manifest.json), or null for DIR/" + split)
        require(self.batch_size > 0, f"{where}.batch_size", f"must be > 0, got {self.batch_size}")
        require(self.eval_batch_size >= 0, f"{where}.eval_batch_size", "must be >= 0")
        require(self.prefetch >= 0, f"{where}.prefetch", "must be >= 0")
        require(self.shuffle_buffer_mb > 0, f"{where}.shuffle_buffer_mb", "must be > 0")
        if self.sample_weights is not None:
            from hpc.data.rowhooks import KINDS  # not at the top: hpc.data imports torch, as below

            require(isinstance(self.sample_weights, dict) and self.sample_weights.get("kind") in KINDS,
                    f"{where}.sample_weights", f"must be a mapping with kind one of {', '.join(KINDS)}")
        if self.augment is not None:
            from hpc.data.augment import Augment  # not at the top: torch, 1.7 s on every `hpc` command

            try:
                Augment.parse(self.augment)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}.augment: {e}") from None


@dataclass
class ModelSection:
    family: str = ""
    # A mapping typed by the family's own dataclass: Any keeps its unquoted values as written (Raw)
    # until check() parses them with those types, then keeps the parsed values.
    config: Any = field(default_factory=dict)

    def check(self, where: str) -> None:
        from hpc.models.families import list_models, model_config  # not at the top: torch, as above

        require(bool(self.family), f"{where}.family", f"is required; one of {', '.join(list_models())}")
        typed = model_config(self.family, self.config, f"{where}.config")
        # model_config accepted it: a mapping, or null (the family's defaults)
        self.config = parsed_mapping(self.config if isinstance(self.config, dict) else {}, typed)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_bias_and_norm: bool = False  # false: no weight decay on 1-d params (biases, norm scales)
    # linear: lr x world size (Goyal et al.), for users who grow the global batch with the ranks.
    lr_scaling: Literal["none", "linear"] = "none"
    schedule: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = 0
    step_size: int = 1000              # schedule=step: multiply by gamma every step_size steps
    gamma: float = 0.1
    min_lr: float = 0.0                # schedule=cosine: the floor
    # One flat-buffer optimizer from hpc.models.ops (one launch for all parameters). false: torch.optim;
    # true/auto: its step follows `kernels`; cupy: always the CuPy kernel (an error without CUDA/CuPy);
    # torch: whole-buffer torch ops even where the layers run CuPy kernels.
    fused: bool | Literal["auto", "cupy", "torch"] = False
    clip_grad_norm: float = 0.0        # 0 = off

    def check(self, where: str) -> None:
        require(self.lr > 0, f"{where}.lr", f"must be > 0, got {self.lr}")
        require(0 <= self.momentum < 1, f"{where}.momentum", f"must be in [0, 1), got {self.momentum}")
        require(not self.nesterov or (self.name == "sgd" and self.momentum > 0), f"{where}.nesterov",
                "needs name=sgd and momentum > 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{where}.betas",
                f"must be two numbers in [0, 1), got {self.betas}")
        require(self.eps > 0, f"{where}.eps", "must be > 0")
        require(self.weight_decay >= 0, f"{where}.weight_decay", "must be >= 0")
        require(self.warmup_steps >= 0, f"{where}.warmup_steps", "must be >= 0")
        require(self.step_size > 0, f"{where}.step_size", "must be > 0")
        require(0 < self.gamma <= 1, f"{where}.gamma", f"must be in (0, 1], got {self.gamma}")
        require(0 <= self.min_lr <= self.lr, f"{where}.min_lr", "must be in [0, lr]")
        require(self.clip_grad_norm >= 0, f"{where}.clip_grad_norm", "must be >= 0")
        require(not (self.fused and self.decay_bias_and_norm is False and self.weight_decay > 0),
                f"{where}.fused", "the fused optimizer has one parameter group: set "
                f"decay_bias_and_norm: true (or weight_decay: 0) with fused: {str(self.fused).lower()}")


@dataclass
class TrainSection:
    epochs: int = 1
    max_steps: int = 0                 # 0 = epochs x batches per epoch
    grad_accum: int = 1                # micro-batches per optimizer step (sync only on the last)
    eval_every: int = 0                # steps; 0 = at the end of every epoch
    log_every: int = 10                # steps between metrics.jsonl lines
    patience: int = 0                  # early stopping: evaluations without improvement; 0 = off
    monitor: str = "loss"              # val metric for best model / early stopping
    max_nonfinite: int = 3             # consecutive non-finite steps skipped before stopping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # bf16/fp16: autocast (fp16 on GPU only)
    progress: bool = True              # rank 0: tqdm bar on a terminal, else a line every HPC_PROGRESS_S

    def check(self, where: str) -> None:
        require(self.epochs >= 1, f"{where}.epochs", f"must be >= 1, got {self.epochs}")
        require(self.max_steps >= 0, f"{where}.max_steps", "must be >= 0")
        require(self.grad_accum >= 1, f"{where}.grad_accum", "must be >= 1")
        require(self.eval_every >= 0, f"{where}.eval_every", "must be >= 0")
        require(self.log_every >= 1, f"{where}.log_every", "must be >= 1")
        require(self.patience >= 0, f"{where}.patience", "must be >= 0")
        require(self.max_nonfinite >= 0, f"{where}.max_nonfinite", "must be >= 0")
        valid = ("loss", "accuracy", "top5", "rmse", "auc")
        require(self.monitor in valid, f"{where}.monitor", f"{self.monitor!r} is not one of {', '.join(valid)}")


@dataclass
class DistSection:
    backend: Literal["auto", "mpi", "torch", "horovod", "local"] = "auto"
    bucket_mb: float = 25.0
    compression: Literal["none", "fp16"] = "none"
    timeout_s: float = 300.0

    def check(self, where: str) -> None:
        require(self.bucket_mb > 0, f"{where}.bucket_mb", "must be > 0")
        require(self.timeout_s > 0, f"{where}.timeout_s", "must be > 0")


@dataclass
class CheckpointSection:
    every_steps: int = 0               # 0 = off
    every_minutes: float = 0.0         # 0 = off (checked at step boundaries, decided by rank 0)
    keep: int = 3
    at_end: bool = True

    def check(self, where: str) -> None:
        require(self.every_steps >= 0, f"{where}.every_steps", "must be >= 0")
        require(self.every_minutes >= 0, f"{where}.every_minutes", "must be >= 0")
        require(self.keep >= 1, f"{where}.keep", f"must be >= 1, got {self.keep}")


HANG_DEFAULT_S = 120.0   # default monitor.hang_s: a stuck rank is named within ~hang_s + 2 heartbeats


@dataclass
class MonitorSection:
    heartbeat_s: float = 5.0           # per-rank heartbeat/rank-R.json for `hpc status|report`; 0 = off
    # A step's comm phase longer than this writes a hang report naming the stuck rank(s); 0 = off.
    # The default 120 s is lowered to half of dist.timeout_s when that is shorter (hpc.train.watch).
    hang_s: float = HANG_DEFAULT_S
    on_hang: Literal["exit", "requeue"] = "exit"   # requeue: rank 0 requeues the Slurm job (resume=auto)
    # Metric sinks (hpc.train.sinks, rank 0): copies of metrics.jsonl that never fail the run.
    tensorboard: bool = False          # event files under <run_dir>/tensorboard/ (extra [tensorboard])
    mlflow_uri: str = ""               # tracking URI: file:./mlruns, sqlite:///mlflow.db, http://host:5000; "" = off
    mlflow_experiment: str = ""        # "" = the config's name

    def check(self, where: str) -> None:
        require(self.heartbeat_s >= 0, f"{where}.heartbeat_s", "must be >= 0")
        require(self.hang_s >= 0, f"{where}.hang_s", "must be >= 0")
        require(self.hang_s in (0, HANG_DEFAULT_S) or self.heartbeat_s > 0, f"{where}.hang_s",
                "needs heartbeat_s > 0")
        require(self.mlflow_uri == "" or (self.mlflow_uri.strip() == self.mlflow_uri and ":" in self.mlflow_uri),
                f"{where}.mlflow_uri", f"must be a tracking URI such as file:./mlruns, sqlite:///mlflow.db or "
                f"http://host:5000, got {self.mlflow_uri!r}")
        require(not self.mlflow_experiment or bool(self.mlflow_uri), f"{where}.mlflow_experiment",
                "needs monitor.mlflow_uri")


@dataclass
class RegistrySection:
    name: str = ""
    alias: str | None = None
    root: str | None = None            # default: $HPC_REGISTRY or ./registry
    source: Literal["best", "last"] = "best"

    def check(self, where: str) -> None:
        require(bool(self.name), f"{where}.name", "is required when registry is set")
        check_name(self.name, f"{where}.name")   # the alias is checked where it is used (Registry.promote)


@dataclass
class TrainConfig:
    name: str = "run"
    run_id: str | None = None          # default: slurm-<job>[_<task>] under Slurm, else a timestamp
    out_dir: str = "runs"
    seed: int = 0
    resume: str = "never"              # never | auto | PATH of a checkpoint directory
    kernels: Literal["auto", "torch", "cupy"] = "auto"
    imports: list[str] = field(default_factory=list)   # modules that register user models
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    dist: DistSection = field(default_factory=DistSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    registry: RegistrySection | None = None

    def check(self, where: str) -> None:
        check_name(self.name, f"{where}.name")   # path components of out_dir/NAME/ID: no '..', no '/'
        if self.run_id is not None:
            check_name(self.run_id, f"{where}.run_id")
        require(self.monitor.hang_s < self.dist.timeout_s or self.monitor.hang_s == HANG_DEFAULT_S,
                f"{where}.monitor.hang_s",
                f"must be below dist.timeout_s={self.dist.timeout_s:g}, or the backend aborts before the "
                "hang report is written")

    def to_dict(self) -> dict:
        return to_dict(self)

    def hash(self) -> str:
        """sha256 of the settings that change the math (not names, paths or logging)."""
        d = self.to_dict()
        for k in ("name", "run_id", "out_dir", "resume", "registry", "checkpoint", "monitor"):
            d.pop(k, None)
        d["train"] = {k: v for k, v in d["train"].items() if k not in ("progress", "log_every")}
        d["dist"] = {k: v for k, v in d["dist"].items() if k != "timeout_s"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def resolve_path(spec: str) -> Path:
    """A config file path, or the name of a shipped config (``digits_cnn`` -> hpc/configs/...)."""
    p = Path(spec)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / (spec if spec.endswith(".yaml") else f"{spec}.yaml")
    if shipped.is_file():
        return shipped
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ValueError(f"config {spec!r}: no such file, and not a shipped config ({', '.join(names)})")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> ``(["optim", "lr"], Raw("1e-3"))``: the value is parsed like a YAML
    value in a file (flow lists/mappings, quotes), its type decided later by the field it lands in."""
    if "=" not in item or item.startswith("="):
        raise ValueError(f"override {item!r}: expected key=value with a dotted key, e.g. optim.lr=0.01")
    key, raw = item.split("=", 1)
    return key.strip().split("."), parse_value(raw)


def apply_overrides(data: dict, overrides, cls: type | None = None) -> dict:
    """Set dotted keys in a nested dict (a copy); intermediate mappings are created as needed.
    With ``cls`` (a config dataclass) a key it does not have is refused, naming the nearest one."""
    # Copy only the mappings on each override's path (the caller's dict is never changed): a full
    # deep copy of a hostile document (shared subtrees) would be the expansion the loader refuses.
    data = dict(data)
    for item in overrides:
        keys, value = parse_override(item)
        if cls is not None:
            check_override_key(cls, keys, item)
        d = data
        for k in keys[:-1]:
            d[k] = dict(d[k]) if isinstance(d.get(k), dict) else {}
            d = d[k]
        d[keys[-1]] = value
    return data


def load_config(source: str | Path | dict | TrainConfig, overrides=()) -> TrainConfig:
    """Read, override and validate; ValueError names the file and the bad key."""
    where = "config"
    if isinstance(source, TrainConfig):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = source
    else:
        path = resolve_path(str(source))
        where = str(path)
        data = read_yaml_mapping(path)
    try:
        data = apply_overrides(data, overrides, TrainConfig)
    except ValueError as e:
        raise ValueError(f"{where}: {e}" if where != "config" else str(e)) from None
    _import_plugins(data.get("imports") or [], where)
    try:
        return from_dict(TrainConfig, data, "config")
    except ValueError as e:
        raise ValueError(f"{where}: {e}" if where != "config" else str(e)) from None


def _import_plugins(modules, where: str) -> None:
    if not isinstance(modules, list):
        raise ValueError(f"{where}: config.imports must be a list of module names")
    for m in modules:
        try:
            importlib.import_module(str(m))
        except ImportError as e:
            raise ValueError(f"{where}: config.imports: cannot import {m!r}: {e}") from None


def dump_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML that ``load_config`` reads back to the same config."""
    return _dump_yaml(cfg.to_dict())
