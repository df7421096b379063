"""Combining member outputs into the ensemble's output (what batch inference writes).

Inputs are the members' outputs as batch inference reports them for a single model
(``hpc.registry.scorers.probabilities``): class probabilities ``[B, C]`` for classification,
predictions ``[B]`` for ratings/regression. The combined output has the same meaning, so the
writer cannot tell an ensemble from a single model: probabilities (rows sum to 1) or predictions.

methods:
  mean      classification: mean of the members' softmax probabilities (weights optional);
            ratings/regression: (weighted) mean of predictions
  vote      classification only: (weighted) fraction of members whose argmax is each class; the
            writer's argmax then breaks ties towards the lower class index
  weighted  boosting: classification SAMME, sum_k alpha_k onehot(argmax h_k) / sum(alpha);
            ratings/regression: sum_k w_k h_k (round 0 weight 1, then the shrinkage)
  stacking  level-0 members grouped by model (one group = that model's fold members, whose
            probabilities are averaged), the groups' log-probabilities (predictions for
            regression) concatenated and fed to the meta-model
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

METHODS = ("mean", "vote", "weighted", "stacking")
META_KINDS = ("softmax", "linear", "mlp")
_LOG_FLOOR = 1e-7  # log-probability features: keeps log(0) finite; costs nothing measurable


class MetaModel(nn.Module):
    """The level-1 model: softmax/linear regression, or a one-hidden-layer MLP."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, hidden: int = 32):
        super().__init__()
        if kind not in META_KINDS:
            raise ValueError(f"meta-model kind {kind!r} is not one of {', '.join(META_KINDS)}")
        self.kind, self.in_dim, self.out_dim, self.hidden = kind, in_dim, out_dim, hidden
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def config(self) -> dict:
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim, "hidden": self.hidden}


def stacking_features(task: str, group_outputs: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Meta-model input from member outputs grouped per level-0 model (fold members averaged)."""
    cols = []
    for group in group_outputs:
        p = torch.stack([o.float() for o in group]).mean(0)
        cols.append(torch.log(p.clamp_min(_LOG_FLOOR)) if task == "classification" else p.reshape(-1, 1))
    return torch.cat(cols, dim=1)


def fit_meta(features: torch.Tensor, targets: torch.Tensor, task: str, kind: str = "softmax",
             epochs: int = 300, lr: float = 0.05, weight_decay: float = 1e-3, hidden: int = 32,
             seed: int = 0, num_classes: int | None = None) -> MetaModel:
    """Full-batch Adam on the out-of-fold features (small: rows x members*classes)."""
    torch.manual_seed(seed)
    if task == "classification":
        out_dim = int(num_classes) if num_classes else int(targets.max()) + 1
    else:
        out_dim = 1
    model = MetaModel(kind, features.shape[1], out_dim, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        out = model(features)
        if task == "classification":
            loss = nn.functional.cross_entropy(out, targets.long())
        else:
            loss = nn.functional.mse_loss(out.reshape(-1), targets.float())
        loss.backward()
        opt.step()
    return model.eval()


def combine(task: str, method: str, outputs: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
            groups: Sequence[Sequence[int]] | None = None, meta: MetaModel | None = None) -> torch.Tensor:
    """Combine the members' outputs (probabilities / predictions) for one batch (see above)."""
    if method not in METHODS:
        raise ValueError(f"combine method {method!r} is not one of {', '.join(METHODS)}")
    if not outputs:
        raise ValueError("combine needs at least one member output")
    if weights is not None and len(weights) != len(outputs):
        raise ValueError(f"{len(weights)} weights for {len(outputs)} members")
    cls = task == "classification"
    if method == "stacking":
        if meta is None or groups is None:
            raise ValueError("stacking needs the meta-model and the member groups")
        with torch.no_grad():
            out = meta(stacking_features(task, [[outputs[i] for i in g] for g in groups]))
        return torch.softmax(out, dim=-1) if cls else out.reshape(-1)
    w = torch.tensor(list(weights) if weights is not None else [1.0] * len(outputs), dtype=torch.float32)
    if method == "vote" or (method == "weighted" and cls):
        if not cls:
            raise ValueError(f"combine {method!r} needs class outputs; task {task} has predictions (use mean)")
        num_classes = outputs[0].shape[-1]
        votes = sum(wk * nn.functional.one_hot(o.argmax(-1), num_classes).float() for wk, o in zip(w, outputs))
        total = float(w.sum())
        return votes / total if total > 0 else votes
    stacked = torch.stack([o.float().reshape(o.shape[0], -1) if cls else o.float().reshape(-1)
                           for o in outputs])                          # [M, B, C] or [M, B]
    wb = w.reshape(-1, *([1] * (stacked.dim() - 1)))
    if method == "weighted":
        return (wb * stacked).sum(0)
    return (wb * stacked).sum(0) / w.sum()


@dataclass
class Combiner:
    """What an ensemble registry entry's model.json describes, ready to call on a batch."""

    task: str
    method: str
    weights: list[float] | None = None
    groups: list[list[int]] | None = None
    meta: MetaModel | None = None
    members: list[str] = field(default_factory=list)

    def __call__(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return combine(self.task, self.method, outputs, self.weights, self.groups, self.meta)

    @classmethod
    def from_card(cls, card: dict, meta_state: dict[str, torch.Tensor] | None = None) -> "Combiner":
        """Build from an ensemble card (``model.json["ensemble"]``) and the meta-model tensors."""
        ens = card.get("ensemble", card)
        meta = None
        if ens.get("method") == "stacking":
            mc = ens.get("meta") or {}
            if meta_state is None:
                raise ValueError("stacking ensemble: the meta-model weights (meta.safetensors) are missing")
            meta = MetaModel(mc["kind"], int(mc["in_dim"]), int(mc["out_dim"]), int(mc.get("hidden", 32)))
            meta.load_state_dict(meta_state)
            meta.eval()
        return cls(task=ens["task"], method=ens["method"], weights=ens.get("weights"),
                   groups=ens.get("groups"), meta=meta, members=list(ens.get("members", [])))
