"""The training and evaluation losses, per sample and as the rank's mean (docs/train.md "One step").

``pred`` is the model's output: logits ``[B, C]`` for classification, predictions ``[B]`` for
ratings/regression (``B``: this rank's batch). A model may define ``loss(pred, batch)`` per sample
(as ``mf`` does); otherwise softmax cross-entropy (through ``hpc.models.ops``) or squared error;
for regression the squared error in standardized target units, ``((pred - y) / std) ** 2`` with the
training targets' std the model scales its output by (``hpc.models.regression``).
"""

from __future__ import annotations

import torch

from hpc.models import ops
from hpc.models.regression import target_std
from hpc.train.inputs import TARGET


def per_sample_loss(model: torch.nn.Module, task: str, pred: torch.Tensor, batch: dict) -> torch.Tensor:
    """``[B]`` losses."""
    if hasattr(model, "loss"):
        return model.loss(pred, batch)
    y = batch[TARGET[task]]
    if task == "classification":
        return ops.softmax_cross_entropy(pred.float(), y, reduction="none")
    err = pred.float() - y.float()
    if task == "regression":
        err = err / target_std(model)
    return err ** 2


def train_loss(model: torch.nn.Module, task: str, weighted: bool, pred: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean over the rank's nominal batch; GradSync's average over ranks makes it the global mean.

    ``weighted``: batches may carry weights other than 1 (padding, ensemble row weights), so the
    loss is ``sum(loss * weight) / B``; else the fused mean cross-entropy kernel does it all.
    """
    if task == "classification" and not weighted and not hasattr(model, "loss"):
        return ops.softmax_cross_entropy(pred.float(), batch[TARGET[task]])  # fused kernel path
    w = batch["weight"].to(pred.device)  # [B]
    return (per_sample_loss(model, task, pred, batch) * w).sum() / w.numel()
