"""SAMME and residual boosting on tiny hand-checked cases (exact values)."""

import math

import numpy as np
import pytest

from hpc.ensemble.boosting import (residual_round_weight, residual_targets, samme_alpha, samme_round,
                                   samme_scores)


def test_samme_two_rounds_by_hand():
    # K = 3 classes, 4 samples, uniform weights; round 1 misses sample 3.
    y = np.array([0, 1, 2, 1])
    r1 = samme_round(y, np.array([0, 1, 2, 0]), np.ones(4), 3)
    # err = 1/4; alpha = log(3/4 / 1/4) + log(2) = log 6
    assert r1.err == 0.25 and not r1.stop
    assert math.isclose(r1.alpha, math.log(6), rel_tol=1e-15)
    # sample 3 gets x6: (1, 1, 1, 6) / 9 * 4 (mean 1)
    np.testing.assert_allclose(r1.weights, np.array([1, 1, 1, 6]) * 4 / 9, rtol=1e-14)
    # round 2 misses sample 0 (weight 4/9 of 4, i.e. err = 1/9): alpha = log(8) + log(2) = log 16
    r2 = samme_round(y, np.array([2, 1, 2, 1]), r1.weights, 3)
    assert math.isclose(r2.err, 1 / 9, rel_tol=1e-14)
    assert math.isclose(r2.alpha, math.log(16), rel_tol=1e-14)
    # weights (1*16, 1, 1, 6) / 24 * 4
    np.testing.assert_allclose(r2.weights, np.array([16, 1, 1, 6]) * 4 / 24, rtol=1e-14)
    # ensemble: sample 0 has log6 for class 0 vs log16 for class 2 -> class 2; sample 3 has
    # log6 for 0 vs log16 for 1 -> class 1
    s = samme_scores([np.array([0, 1, 2, 0]), np.array([2, 1, 2, 1])], [r1.alpha, r2.alpha], 3)
    np.testing.assert_allclose(s.sum(1), 1.0)
    assert list(s.argmax(1)) == [2, 1, 2, 1]
    np.testing.assert_allclose(s[1], [0, 1, 0])


def test_samme_stops_at_chance_and_at_perfect():
    y = np.array([0, 1, 0, 1])
    r = samme_round(y, 1 - y, np.ones(4), 2)  # all wrong, binary: err 1 >= 1/2
    assert r.stop and r.alpha == 0.0 and "chance" in r.reason
    np.testing.assert_array_equal(r.weights, np.ones(4))
    r = samme_round(y, y, np.ones(4), 2)
    assert r.stop and math.isfinite(r.alpha) and r.alpha > 20
    # multi-class: err 0.6 is still better than chance (2/3) for K = 3, so alpha > 0
    assert samme_alpha(0.6, 3) == pytest.approx(math.log(0.4 / 0.6) + math.log(2))
    assert samme_alpha(0.6, 3) > 0


def test_residuals_by_hand():
    y = np.array([3.0, 1.0, 4.0])
    assert residual_targets(y, None).tolist() == [3.0, 1.0, 4.0]
    f = np.array([2.5, 1.5, 4.0])
    assert residual_targets(y, f).tolist() == [0.5, -0.5, 0.0]
    assert residual_round_weight(0, 0.5) == 1.0 and residual_round_weight(3, 0.5) == 0.5
    with pytest.raises(ValueError, match="shrinkage"):
        residual_round_weight(1, 0.0)
    with pytest.raises(ValueError, match="match"):
        residual_targets(y, f[:2])
