"""`eval.tilt.learned_tilt`: how much of r_λ/β a trained model carries, on π_ref's samples."""
from __future__ import annotations

import numpy as np
import pytest

from dualign.dual.problem import DualProblem
from dualign.eval.tilt import learned_tilt, learned_tilt_from_dict, learned_tilt_line


def _scores(n=60, k=6, m=1, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, k)), rng.normal(size=(n, k, m))


@pytest.mark.parametrize("a", [0.0, 0.4, 1.0, 2.5])
def test_a_scaled_tilt_plus_any_prompt_constant_has_that_slope(a):
    reward, safety = _scores()
    target = (reward + 1.7 * safety[:, :, 0]) / 0.5
    offsets = np.random.default_rng(1).normal(scale=30, size=(len(reward), 1))  # log Z per prompt
    t = learned_tilt(a * target + offsets, target, reward, safety, ["harm"], n_boot=50)
    assert t.slope == pytest.approx(a, abs=1e-12)
    assert t.slope_ci[0] == pytest.approx(a, abs=1e-9) and t.slope_ci[1] == pytest.approx(a, abs=1e-9)
    if a > 0:
        assert t.correlation == pytest.approx(1.0, abs=1e-12)
    else:  # π_θ = π_ref: uniform weights, nothing gained, every sample counts
        assert t.reweighted_reward_gain == pytest.approx(0.0, abs=1e-12)
        assert t.ess_mean == pytest.approx(6.0)


def test_the_exact_tilt_reweights_as_the_dual_predicts():
    """π_θ = π_λ*: the reweighted gains are the dual's predicted gains at λ, to rounding."""
    reward, safety = _scores(m=2)
    lam, beta = np.array([0.8, 2.0]), 0.3
    target = (reward + safety @ lam) / beta
    t = learned_tilt(target - 5.0, target, reward, safety, ["a", "b"], n_boot=0)
    p = DualProblem(reward, safety, beta).predict(lam)
    assert t.reweighted_reward_gain == pytest.approx(p.reward_gain, abs=1e-12)
    gains = [t.reweighted_safety_gain["a"], t.reweighted_safety_gain["b"]]
    assert gains == pytest.approx(list(p.safety_gain), abs=1e-12)
    assert t.ess_mean == pytest.approx(p.ess_mean, abs=1e-12)


def test_a_log_ratio_unrelated_to_the_target_has_a_slope_near_zero():
    reward, safety = _scores(n=2000, k=4)
    target = reward + safety[:, :, 0]
    noise = np.random.default_rng(7).normal(size=reward.shape)
    t = learned_tilt(noise, target, reward, safety, ["harm"], n_boot=200)
    assert abs(t.slope) < 0.05 and t.slope_ci[0] < 0 < t.slope_ci[1]
    assert abs(t.correlation) < 0.05


def test_the_line_names_the_slope_and_both_reweightings():
    reward, safety = _scores(n=10, k=3)
    t = learned_tilt(0.5 * reward, reward, reward, safety, ["safety/harm"], n_boot=20)
    line = learned_tilt_line(t, {"reward": 0.9, "safety/harm": 0.2})
    assert "slope of log π_θ/π_ref on r_λ/β 0.500" in line and "(π_λ*: +0.900)" in line
    assert "safety/harm" in line and "of the 10 held-out prompts" in line
    assert learned_tilt_from_dict(t.to_dict()) == t


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "target": a["target"][:, :2]}, "must be"),
    (lambda a: {**a, "safety_names": ["x", "y"]}, "2 names"),
    (lambda a: {k: (v[:, :1] if k != "safety_names" else v) for k, v in a.items()}, "at least 2 samples"),
    (lambda a: {**a, "logratio": np.where(a["logratio"] > 0, np.nan, a["logratio"])}, "finite"),
])
def test_bad_input_raises(change, message):
    reward, safety = _scores(n=5, k=3)
    args = dict(logratio=reward.copy(), target=reward.copy(), reward=reward, safety=safety, safety_names=["h"])
    with pytest.raises(ValueError, match=message):
        learned_tilt(**change(args))
