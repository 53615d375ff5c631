"""The jackknife correction of the dual's K-sample predictions (`dualign.dual.sample_bias`)."""
import numpy as np
import pytest

from dualign.dual import DualProblem, sample_bias, trusted_correction


def test_two_samples_double_the_plug_in_gains_and_kl():
    # with K = 2 each leave-one-out estimate is one sample: its tilted mean is that sample's score
    # and its KL is 0, so the jackknife gives 2·(gain) and 2·KL exactly
    rng = np.random.default_rng(0)
    R, G = rng.normal(size=(7, 2)), rng.normal(size=(7, 2))
    b = sample_bias(DualProblem(R, G, 0.5), [0.8])
    assert b.reward_gain_corrected == pytest.approx(2 * b.reward_gain, abs=1e-12)
    assert b.safety_gain_corrected[0] == pytest.approx(2 * b.safety_gain[0], abs=1e-12)
    assert b.kl_corrected == pytest.approx(2 * b.kl, abs=1e-12)


def test_a_correction_is_trusted_only_within_half_of_the_prediction():
    rng = np.random.default_rng(0)
    b = sample_bias(DualProblem(rng.normal(size=(7, 2)), rng.normal(size=(7, 2)), 0.5), [0.8])  # K = 2: doubles
    assert not trusted_correction(b.reward_gain, b.reward_gain_corrected)
    assert not trusted_correction(b.kl, b.kl_corrected)
    assert trusted_correction(1.0, 1.5) and not trusted_correction(1.0, 1.5001)
    assert trusted_correction(-0.2, -0.25) and not trusted_correction(-0.2, 0.2)  # a sign flip is never trusted
    assert not trusted_correction(0.3, None)
    assert trusted_correction(0.0, 1e-12)  # a zero prediction moved by rounding


def test_plug_in_values_are_the_problems_predictions():
    rng = np.random.default_rng(1)
    R, G = rng.normal(size=(20, 6)), rng.normal(size=(20, 6, 2))
    problem = DualProblem(R, G, 0.3)
    b, p = sample_bias(problem, [0.4, 1.3]), problem.predict([0.4, 1.3])
    assert b.reward_gain == pytest.approx(p.reward_gain, abs=1e-12)
    np.testing.assert_allclose(b.safety_gain, p.safety_gain, atol=1e-12)
    assert b.kl == pytest.approx(p.kl, abs=1e-12)


def test_no_tilt_has_nothing_to_correct():
    rng = np.random.default_rng(2)
    R, G = np.full((5, 4), 3.0), rng.normal(size=(5, 4))
    b = sample_bias(DualProblem(R, G, 1.0), [0.0])  # λ = 0 and a constant reward: π_λ = π_ref
    assert b.reward_gain_corrected == pytest.approx(0, abs=1e-12)
    assert b.safety_gain_corrected[0] == pytest.approx(0, abs=1e-12)
    assert b.kl_corrected == pytest.approx(0, abs=1e-12)
    assert b.relative_shift() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("k, left", [(4, 1 / 2), (8, 1 / 3), (16, 1 / 3)])
def test_correction_removes_most_of_the_bias_against_the_exact_tilt(k, left):
    # π_ref uniform over 50 answers with known scores: the tilted policy's gains and KL are exact;
    # a moderate tilt (exact KL 0.93 nats), where the 1/K expansion behind the jackknife holds
    rng = np.random.default_rng(0)
    r, g = 1.5 * rng.normal(size=50), rng.normal(size=50)
    beta, lam = 1.0, 0.7
    w = np.exp((r + lam * g) / beta)
    w /= w.sum()
    exact = (w @ r - r.mean(), w @ g - g.mean(), float(np.sum(w * np.log(w * 50))))
    idx = rng.integers(0, 50, size=(4000, k))  # 4000 prompts, each with K reference samples
    b = sample_bias(DualProblem(r[idx], g[idx], beta), [lam])
    plug = (b.reward_gain, b.safety_gain[0], b.kl)
    corr = (b.reward_gain_corrected, b.safety_gain_corrected[0], b.kl_corrected)
    for e, p, c in zip(exact, plug, corr):
        assert p < e  # a K-sample reweighting under-predicts how far π_λ moves
        assert abs(c - e) < left * abs(p - e)  # at K = 4 more than half of it, from K = 8 two thirds


def test_one_sample_per_prompt_raises():
    with pytest.raises(ValueError, match="K >= 2"):  # the problem itself refuses K = 1
        sample_bias(DualProblem(np.zeros((3, 1)), np.zeros((3, 1)), 1.0), [1.0])
