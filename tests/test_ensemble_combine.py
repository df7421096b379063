"""Combining member outputs: mean, vote, weighted (SAMME / residual sum), stacking meta-model."""

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from hpc.ensemble.boosting import samme_scores
from hpc.models.combine import Combiner, combine, fit_meta, stacking_features

P1 = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
P2 = torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.3, 0.7]])
P3 = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])


def test_mean_and_vote():
    m = combine("classification", "mean", [P1, P2, P3])
    torch.testing.assert_close(m, (P1 + P2 + P3) / 3)
    v = combine("classification", "vote", [P1, P2, P3])
    torch.testing.assert_close(v, torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]]))
    r = combine("ratings", "mean", [torch.tensor([3.0, 4.0]), torch.tensor([5.0, 2.0])], weights=[1, 3])
    torch.testing.assert_close(r, torch.tensor([4.5, 2.5]))
    with pytest.raises(ValueError, match="vote"):
        combine("ratings", "vote", [torch.ones(2), torch.ones(2)])
    with pytest.raises(ValueError, match="one of"):
        combine("classification", "median", [P1])


def test_weighted_is_samme_and_residual_sum():
    alphas = [np.log(6), np.log(16), 0.5]
    got = combine("classification", "weighted", [P1, P2, P3], weights=alphas)
    want = samme_scores([p.argmax(1).numpy() for p in (P1, P2, P3)], alphas, 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    h = [torch.tensor([3.0, 4.0]), torch.tensor([0.5, -1.0]), torch.tensor([0.2, 0.2])]
    torch.testing.assert_close(combine("ratings", "weighted", h, weights=[1, 0.5, 0.5]),
                               torch.tensor([3.35, 3.6]))


def test_stacking_learns_to_trust_the_good_member_and_round_trips():
    g = torch.Generator().manual_seed(0)
    n, c = 600, 4
    y = torch.randint(0, c, (n,), generator=g)
    good = torch.softmax(3 * torch.nn.functional.one_hot(y, c).float() + torch.randn(n, c, generator=g), 1)
    noise = torch.softmax(2 * torch.randn(n, c, generator=g), 1)
    # groups: member 0,1 = two fold models of the noise family; member 2 = the good family
    outs = [noise, noise.roll(1, 0), good]
    groups = [[0, 1], [2]]
    feats = stacking_features("classification", [[outs[i] for i in gr] for gr in groups])
    assert feats.shape == (n, 2 * c)
    meta = fit_meta(feats, y, "classification", kind="softmax", epochs=200)
    probs = combine("classification", "stacking", outs, groups=groups, meta=meta)
    torch.testing.assert_close(probs.sum(1), torch.ones(n))
    acc_stack = float((probs.argmax(1) == y).float().mean())
    acc_mean = float((combine("classification", "mean", outs).argmax(1) == y).float().mean())
    assert acc_stack > acc_mean + 0.05, (acc_stack, acc_mean)
    # model.json + meta.safetensors -> the same combiner
    card = {"ensemble": {"task": "classification", "method": "stacking", "groups": groups,
                         "meta": meta.config(), "members": ["a@1", "a@2", "b@1"]}}
    again = Combiner.from_card(card, load(save(meta.state_dict())))
    torch.testing.assert_close(again(outs), probs)
    with pytest.raises(ValueError, match="meta-model weights"):
        Combiner.from_card(card, None)
