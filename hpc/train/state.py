"""The trainer's progress as one value (what a checkpoint stores and a resume restores), and how
a run ended (``Outcome``).

Everything the loop needs to continue exactly where it stopped, besides the tensors (model,
optimizer, grad scaler), the RNG states and the reader position, which the checkpoint keeps next to
it. ``state_dict()`` gives the keys of the checkpoint's ``shared`` dict (``meta.json``), the same
keys checkpoints have always had, so older checkpoints load.
"""

from __future__ import annotations

import copy
import dataclasses
import math


def _no_best() -> dict:
    return {"value": None, "step": None, "metrics": {}}


@dataclasses.dataclass
class TrainState:
    step: int = 0               # optimizer steps taken (skipped non-finite steps do not count)
    epoch: int = 0              # the epoch in progress
    batch_in_epoch: int = 0     # reader batches of this epoch consumed (grad_accum per step)
    last_val_step: int = -1     # the step of the latest validation
    best: dict = dataclasses.field(default_factory=_no_best)   # best val: value, step, metrics
    evals_since_best: int = 0   # validations without improvement (early stopping)
    nonfinite_run: int = 0      # non-finite steps skipped in a row

    def __post_init__(self) -> None:
        # Metrics of the latest validation (the run's end checks them for non-finite values); not a
        # field: the checkpoint keys stay what they have always been.
        self.last_val: dict = {}

    @property
    def position(self) -> tuple[int, int, int]:
        """Where the loop is: a checkpoint at the same position would be the same checkpoint."""
        return (self.step, self.epoch, self.batch_in_epoch)

    def record_eval(self, value: float, metrics: dict, higher_is_better: bool) -> bool:
        """Note a validation at this step; True when its ``value`` is the best so far."""
        self.last_val_step = self.step
        self.last_val = metrics
        best = self.best["value"]
        if not math.isfinite(value):  # NaN compares false with everything: it would stay "best"
            self.evals_since_best += 1
            return False
        if best is None or (value > best if higher_is_better else value < best):
            self.best = {"value": value, "step": self.step, "metrics": metrics}
            self.evals_since_best = 0
            return True
        self.evals_since_best += 1
        return False

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)  # a deep copy: the checkpoint never aliases live state

    def load_state_dict(self, d: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, copy.deepcopy(d[f.name]))


@dataclasses.dataclass
class Outcome:
    """How ``Trainer.fit`` ended; ``hpc.train.runner.summarize`` makes the run summary of it."""
    state: str                      # completed | failed | preempted
    reason: str | None = None       # "early_stopping", the error, or "signal SIGUSR2"
    test: dict = dataclasses.field(default_factory=dict)   # test metrics of the best model
    signal: str | None = None       # preempted: the signal's name
