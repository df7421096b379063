"""Evaluation metrics accumulated as sums on each rank and all-reduced once (one float64 vector).

Classification: loss, accuracy, top-5 accuracy (more than 5 classes), AUC (2 classes).
Ratings/regression: loss, RMSE (and AUC for implicit-feedback BCE models); given the training
targets' mean, also ``rmse_train_mean``: the RMSE of predicting that mean for every row, the
baseline a model's RMSE must beat.
Padding samples (weight 0) count nowhere. AUC comes from score histograms (``AUC_BINS`` bins over
[0, 1]) so it all-reduces in fixed memory; samples in the same bin count as ties (1/2), which
bounds the error by the fraction of positive/negative pairs sharing a bin (tiny at 4096 bins).
"""

from __future__ import annotations

import math

import torch

AUC_BINS = 4096


def auc_from_histograms(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2). Pure."""
    pos, neg = pos.double(), neg.double()
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = torch.cumsum(neg, 0) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


class MetricSums:
    """Per-rank running sums for one evaluation pass; ``reduce(comm)`` gives the global metrics."""

    def __init__(self, task: str, num_classes: int = 0, binary_scores: bool = False,
                 target_mean: float | None = None):
        self.task, self.num_classes = task, num_classes
        self.top5 = task == "classification" and num_classes > 5
        self.auc = binary_scores or (task == "classification" and num_classes == 2)
        self.target_mean = None if task == "classification" else target_mean
        # [weight, loss, correct, top5, squared error, squared error of the training mean]
        self.sums = torch.zeros(6, dtype=torch.float64)
        self.pos = torch.zeros(AUC_BINS, dtype=torch.float64) if self.auc else None
        self.neg = torch.zeros(AUC_BINS, dtype=torch.float64) if self.auc else None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, loss: torch.Tensor,
               weight: torch.Tensor) -> None:
        """``loss``: per-sample loss; ``weight``: 1 for real samples, 0 for padding."""
        w = weight.detach().double().cpu()
        pred, target, loss = pred.detach().float().cpu(), target.detach().cpu(), loss.detach().double().cpu()
        s = self.sums
        s[0] += w.sum()
        s[1] += (loss * w).sum()
        if self.task == "classification":
            t = target.long()
            s[2] += ((pred.argmax(1) == t).double() * w).sum()
            if self.top5:
                s[3] += ((pred.topk(5, dim=1).indices == t[:, None]).any(1).double() * w).sum()
            score = torch.softmax(pred, 1)[:, 1] if self.auc else None
            label = t == 1
        else:
            s[4] += (((pred.double() - target.double()) ** 2) * w).sum()
            if self.target_mean is not None:
                s[5] += (((self.target_mean - target.double()) ** 2) * w).sum()
            score = torch.sigmoid(pred) if self.auc else None
            label = target > 0.5
        if self.auc:
            bins = (score.double() * AUC_BINS).long().clamp_(0, AUC_BINS - 1)
            self.pos.index_add_(0, bins, w * label.double())
            self.neg.index_add_(0, bins, w * (~label).double())

    def reduce(self, comm) -> dict[str, float]:
        parts = [self.sums] + ([self.pos, self.neg] if self.auc else [])
        flat = torch.cat(parts)
        dev = getattr(comm, "device", None)
        if dev is None or dev.type == "cpu":
            comm.allreduce_(flat)
        else:  # the sums live on the CPU; a backend that reduces device tensors (NCCL) gets a copy
            flat = comm.allreduce_(flat.to(dev)).cpu()
        sums = flat[:6]
        n = float(sums[0])
        out: dict[str, float] = {"samples": n}
        if n == 0:
            return out
        out["loss"] = float(sums[1]) / n
        if self.task == "classification":
            out["accuracy"] = float(sums[2]) / n
            if self.top5:
                out["top5"] = float(sums[3]) / n
        else:
            out["rmse"] = math.sqrt(float(sums[4]) / n)
            if self.target_mean is not None:
                out["rmse_train_mean"] = math.sqrt(float(sums[5]) / n)
        if self.auc:
            out["auc"] = auc_from_histograms(flat[6:6 + AUC_BINS], flat[6 + AUC_BINS:])
        return out


def samples_per_s(samples: float, step_s: float) -> float:
    """THE training throughput, one definition for metrics.jsonl, progress lines and summary.json
    (which ``hpc report`` reads): global samples in completed optimizer steps / seconds spent
    in those steps (data wait + compute + gradient sync; evaluation, checkpointing and start-up
    excluded, so it measures the training loop, not how often one evaluates). 0 before any step."""
    return samples / step_s if step_s > 0 else 0.0


def higher_is_better(metric: str) -> bool:
    return metric in ("accuracy", "top5", "auc")
