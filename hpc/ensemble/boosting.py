"""Boosting math (pure numpy): SAMME sample weights for multi-class, residual targets for regression.

Classification (SAMME, Zhu et al. 2009): round k trains with per-sample weights w; its weighted
error err = sum(w * miss) / sum(w); its weight alpha = log((1 - err) / err) + log(K - 1), which is
positive iff the round beats chance (err < 1 - 1/K); misclassified samples are multiplied by
exp(alpha) and the weights renormalized. The ensemble predicts argmax_c sum_k alpha_k [h_k(x) = c].

Regression and ratings (least-squares gradient boosting): round 0 fits y; round k >= 1 fits the
residual r = y - F_{k-1}(x) of the ensemble so far; F_k = F_{k-1} + nu * h_k, so round weights are
(1, nu, nu, ...), nu the shrinkage. Both are combined by the weighted sum in combine.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# An error of exactly 0 would give alpha = +inf; a round that perfect ends boosting (there is
# nothing left to reweight), and it gets the finite weight of err = 1e-10 (alpha ~ 23 + log(K-1)).
MIN_ERR = 1e-10


@dataclass(frozen=True)
class SammeRound:
    err: float              # weighted training error of this round
    alpha: float            # its weight in the ensemble (0 when it does not beat chance)
    weights: np.ndarray     # the next round's sample weights, mean 1 (float64)
    stop: bool              # no further round can help (perfect, or no better than chance)
    reason: str = ""


def samme_alpha(err: float, num_classes: int) -> float:
    if num_classes < 2:
        raise ValueError(f"SAMME needs num_classes >= 2, got {num_classes}")
    err = min(max(float(err), MIN_ERR), 1.0 - MIN_ERR)
    return math.log((1.0 - err) / err) + math.log(num_classes - 1)


def normalize(weights: np.ndarray, total: float | None = None) -> np.ndarray:
    """Scale weights to sum ``total`` (default: their count, i.e. mean 1, the trainer's scale)."""
    w = np.asarray(weights, dtype=np.float64)
    s = w.sum()
    assert s > 0 and np.all(w >= 0), "sample weights must be non-negative with a positive sum"
    return w * ((len(w) if total is None else total) / s)


def samme_round(y: np.ndarray, pred: np.ndarray, weights: np.ndarray, num_classes: int) -> SammeRound:
    """One SAMME step from the labels, this round's predicted classes and its training weights."""
    y, pred = np.asarray(y), np.asarray(pred)
    w = np.asarray(weights, dtype=np.float64)
    if not (y.shape == pred.shape == w.shape) or y.ndim != 1:
        raise ValueError(f"labels, predictions and weights must be 1-d of one length, got "
                         f"{y.shape}, {pred.shape}, {w.shape}")
    miss = pred != y
    err = float((w * miss).sum() / w.sum())
    chance = 1.0 - 1.0 / num_classes
    if err >= chance:
        # SAMME discards such a round: weighting it would push the ensemble towards wrong classes.
        return SammeRound(err, 0.0, normalize(w), True,
                          f"weighted error {err:.4f} >= chance level {chance:.4f}")
    alpha = samme_alpha(err, num_classes)
    new = normalize(w * np.exp(alpha * miss))
    if err <= MIN_ERR:
        return SammeRound(err, alpha, new, True, "weighted error 0: the round fits every sample")
    return SammeRound(err, alpha, new, False)


def samme_scores(preds: list[np.ndarray], alphas: list[float], num_classes: int) -> np.ndarray:
    """[N, K] class scores sum_k alpha_k [h_k = c], divided by sum(alpha) so rows sum to 1."""
    assert len(preds) == len(alphas) and preds
    total = float(sum(alphas))
    out = np.zeros((len(preds[0]), num_classes))
    for p, a in zip(preds, alphas):
        out[np.arange(len(p)), np.asarray(p)] += a
    return out / total if total > 0 else out


def residual_targets(y: np.ndarray, ensemble_pred: np.ndarray | None) -> np.ndarray:
    """Targets for the next regression round: y minus the ensemble so far (y itself for round 0)."""
    y = np.asarray(y, dtype=np.float64)
    if ensemble_pred is None:
        return y.astype(np.float32)
    f = np.asarray(ensemble_pred, dtype=np.float64)
    if f.shape != y.shape:
        raise ValueError(f"ensemble predictions {f.shape} do not match targets {y.shape}")
    return (y - f).astype(np.float32)


def residual_round_weight(round_index: int, shrinkage: float) -> float:
    """Round 0 fits the targets at weight 1; later rounds fit residuals at weight ``shrinkage``."""
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"boosting shrinkage must be in (0, 1], got {shrinkage}")
    return 1.0 if round_index == 0 else float(shrinkage)
