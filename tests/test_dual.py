"""The dual's math against finite differences, closed forms and a direct primal solve."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy.optimize import minimize

from dualign import (DualProblem, InfeasibleMarginError, bootstrap_dual, lambda_for_margins,
                     margin_for_lambda, solve_dual)


def random_instance(seed, n=40, k=8, m=1, rho=0.4):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(n, k))
    g = rho * r[:, :, None] + rng.normal(size=(n, k, m))
    return r, g


@pytest.mark.parametrize("m", [1, 2, 4])
def test_grad_and_hessian_match_finite_differences(m):
    r, g = random_instance(m, m=m)
    p = DualProblem(r, g, beta=0.5, margins=np.linspace(0.1, 0.3, m))
    lam = np.linspace(0.2, 0.9, m)
    eps = 1e-6
    fd_grad = np.array([(p.value(lam + eps * e) - p.value(lam - eps * e)) / (2 * eps) for e in np.eye(m)])
    np.testing.assert_allclose(p.grad(lam), fd_grad, rtol=1e-6, atol=1e-8)
    fd_hess = np.array([(p.grad(lam + eps * e) - p.grad(lam - eps * e)) / (2 * eps) for e in np.eye(m)])
    np.testing.assert_allclose(p.hessian(lam), fd_hess, rtol=1e-5, atol=1e-7)
    assert np.all(np.linalg.eigvalsh(p.hessian(lam)) >= -1e-12)


def test_value_matches_direct_formula():
    r, g = random_instance(3, m=2)
    beta, b, lam = 0.3, np.array([0.2, 0.1]), np.array([0.5, 1.5])
    z = (r + g @ lam) / beta
    direct = beta * np.mean(np.log(np.mean(np.exp(z), axis=1))) - lam @ (g.mean(axis=(0, 1)) + b)
    assert DualProblem(r, g, beta, b).value(lam) == pytest.approx(direct, rel=1e-12)


def test_gaussian_closed_forms():
    """For jointly Gaussian (r, g): E_{π_λ}[g] = μ_g + (Σ_gr + λΣ_gg)/β and
    λ* = (βb − Σ_gr)/Σ_gg (the tilt of a Gaussian is a shifted Gaussian)."""
    rng = np.random.default_rng(0)
    mu = np.array([1.0, -2.0])
    cov = np.array([[0.09, 0.03], [0.03, 0.16]])
    x = rng.multivariate_normal(mu, cov, size=(50, 4000))
    r, g = x[..., 0], x[..., 1]
    beta, lam = 1.0, 0.7
    p = DualProblem(r, g, beta, 0.0)
    expected_gain = (cov[0, 1] + lam * cov[1, 1]) / beta
    assert p.predict(lam).safety_gain[0] == pytest.approx(expected_gain, rel=0.03)
    # KL of a mean-shifted Gaussian tilt: (σ_r² + 2λσ_rg + λ²σ_g²) / (2β²)
    var_z = (cov[0, 0] + 2 * lam * cov[0, 1] + lam ** 2 * cov[1, 1]) / beta ** 2
    assert p.predict(lam).kl == pytest.approx(var_z / 2, rel=0.05)
    b = 0.2
    res = solve_dual(r, g, beta, b)
    assert res.converged
    assert res.lam[0] == pytest.approx((beta * b - cov[0, 1]) / cov[1, 1], rel=0.05)


def primal_policy(r, g, beta, b):
    """Solve max_π mean_x[Σ π r − β KL(π‖uniform)] s.t. mean_x Σ π g_j − ḡ_j >= b_j directly,
    with a generic optimizer over per-prompt logits."""
    n, k, m = g.shape
    gbar = g.mean(axis=(0, 1))

    def pi(theta):
        t = theta.reshape(n, k)
        t = t - t.max(axis=1, keepdims=True)
        e = np.exp(t)
        return e / e.sum(axis=1, keepdims=True)

    def neg_obj(theta):
        p = pi(theta)
        return -(np.sum(p * r) - beta * np.sum(p * np.log(p * k + 1e-300))) / n

    cons = [{"type": "ineq", "fun": (lambda th, j=j: np.einsum("nk,nk->", pi(th), g[:, :, j]) / n - gbar[j] - b[j])}
            for j in range(m)]
    best = minimize(neg_obj, np.zeros(n * k), method="SLSQP", constraints=cons,
                    options={"ftol": 1e-14, "maxiter": 1000})
    assert best.success, best.message
    return pi(best.x)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_dual_solution_is_the_primal_optimum(m):
    r, g = random_instance(10 + m, n=4, k=5, m=m, rho=-0.5)  # safety fights reward: constraints bite
    beta = 0.5
    p = DualProblem(r, g, beta, 0.0)
    b = 0.4 * p.max_gain()
    res = solve_dual(r, g, beta, b)
    assert res.converged and res.scaled_kkt_residual < 1e-9
    z = (r + g @ res.lam) / beta
    tilted = np.exp(z - z.max(axis=1, keepdims=True))
    tilted /= tilted.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(tilted, primal_policy(r, g, beta, b), atol=2e-4)


def test_inactive_constraint_gives_exactly_zero():
    r, g = random_instance(1, rho=0.9)  # reward already buys safety
    res = solve_dual(r, g, 0.1, 0.0)
    assert res.lam[0] == 0.0 and res.converged
    assert res.slack[0] >= 0
    # mixed: first constraint active, second slack
    rng = np.random.default_rng(2)
    g2 = np.stack([-r + rng.normal(size=r.shape), r + 0.1 * rng.normal(size=r.shape)], axis=-1)
    res = solve_dual(r, g2, 0.5, [0.3, 0.0])
    assert res.lam[0] > 0 and res.lam[1] == 0.0
    assert abs(res.slack[0]) < 1e-9 and res.slack[1] > 0


def test_infeasible_margin_names_constraint_and_max_gain():
    r, g = random_instance(4, m=2)
    mg = DualProblem(r, g, 0.1, 0.0).max_gain()
    with pytest.raises(InfeasibleMarginError) as ei:
        solve_dual(r, g, 0.1, [0.1, mg[1] * 1.01], names=["harm", "privacy"])
    assert "privacy" in str(ei.value) and f"{mg[1]:.6g}" in str(ei.value)
    np.testing.assert_allclose(ei.value.max_gain, mg)
    assert isinstance(ei.value, ValueError)
    with pytest.raises(InfeasibleMarginError):  # exactly at the edge is out of reach too
        solve_dual(r, g[:, :, 0], 0.1, mg[0])


def test_jointly_infeasible_margins_are_detected():
    """Each prompt offers g = (1, 0) or (0, 1): each margin alone is reachable, both are not."""
    n, k = 30, 2
    g = np.zeros((n, k, 2))
    g[:, 0, 0] = 1
    g[:, 1, 1] = 1
    r = np.random.default_rng(0).normal(size=(n, k))
    # g1 + g2 = 1 on every sample, so E[g1] + E[g2] = 1 under any policy; ḡ = (0.5, 0.5).
    res = solve_dual(r, g, 0.1, [0.2, -0.3])  # E[g1] >= 0.7, E[g2] >= 0.2: reachable
    assert res.converged and res.lam[0] > 0
    with pytest.raises(InfeasibleMarginError, match="together") as ei:
        solve_dual(r, g, 0.1, [0.2, 0.2])  # E[g1] + E[g2] >= 1.4 > 1
    np.testing.assert_allclose(ei.value.max_gain, [0.5, 0.5])


@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_extreme_score_magnitudes(scale):
    r, g = random_instance(5, rho=-0.3)
    base = solve_dual(r, g, 0.5, 0.3)
    # Scaling r, g, β and b together leaves the tilt unchanged, so λ* is the same.
    scaled = solve_dual(r * scale, g * scale, 0.5 * scale, 0.3 * scale)
    assert scaled.converged
    np.testing.assert_allclose(scaled.lam, base.lam, rtol=1e-7)
    # Scores huge relative to β: the tilt is nearly one-hot, still solved and finite.
    hard = solve_dual(r * scale, g * scale, 0.1, 0.3 * scale)
    assert hard.converged and np.all(np.isfinite(hard.lam))


def test_invariant_to_prompt_constant_in_reward():
    r, g = random_instance(6, m=2, rho=-0.5)
    shift = np.random.default_rng(1).normal(scale=100, size=(r.shape[0], 1))
    b = [0.2, 0.1]
    np.testing.assert_allclose(solve_dual(r + shift, g, 0.2, b).lam, solve_dual(r, g, 0.2, b).lam, rtol=1e-8)


@pytest.mark.parametrize("reward,safety,beta,margins,msg", [
    (np.array([[1.0, np.nan]]), np.zeros((1, 2)), 0.1, 0.0, "non-finite"),
    (np.zeros((3, 4)), np.zeros((3, 5)), 0.1, 0.0, "shape"),
    (np.zeros((3, 1)), np.zeros((3, 1)), 0.1, 0.0, "K >= 2"),
    (np.zeros((3, 4)), np.zeros((3, 4)), 0.0, 0.0, "beta"),
    (np.zeros((3, 4)), np.zeros((3, 4)), -1.0, 0.0, "beta"),
    (np.zeros((3, 4)), np.zeros((3, 4, 2)), 0.1, [0.1, 0.2, 0.3], "margins"),
    (np.zeros(4), np.zeros(4), 0.1, 0.0, "shape"),
])
def test_bad_inputs_raise_clear_value_errors(reward, safety, beta, margins, msg):
    with pytest.raises(ValueError, match=msg):
        solve_dual(reward, safety, beta, margins)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    r, g = random_instance(7, n=80, rho=-0.3)
    a = bootstrap_dual(r, g, 0.5, 0.3, n_boot=100, seed=3)
    b = bootstrap_dual(r, g, 0.5, 0.3, n_boot=100, seed=3)
    np.testing.assert_array_equal(a.ci["lambda"], b.ci["lambda"])
    lo, hi = a.ci["lambda"][0]
    assert lo < a.estimate.lam[0] < hi
    assert a.ci["safety_gain"].shape == (1, 2) and a.ci["kl"].shape == (1, 2)
    assert a.replicates["lambda"].shape == (100 - a.n_infeasible, 1)
    c = bootstrap_dual(r, g, 0.5, 0.3, n_boot=100, seed=4)
    assert not np.array_equal(a.ci["lambda"], c.ci["lambda"])


def test_margin_lambda_maps_are_inverse():
    r, g = random_instance(8, rho=-0.3)
    margins = np.array([0.1, 0.3, 0.6])
    lams = lambda_for_margins(r, g, 0.5, margins)
    assert lams.shape == (3, 1) and np.all(np.diff(lams[:, 0]) > 0)
    np.testing.assert_allclose(margin_for_lambda(r, g, 0.5, lams[:, 0])[:, 0], margins, atol=1e-8)
    r2, g2 = random_instance(9, m=2, rho=-0.3)
    lam = lambda_for_margins(r2, g2, 0.5, [0.2, 0.3])
    assert lam.shape == (2,)
    np.testing.assert_allclose(margin_for_lambda(r2, g2, 0.5, lam), [0.2, 0.3], atol=1e-8)


def test_predictions_at_zero_lambda_and_ess_bounds():
    r, g = random_instance(11)
    p = DualProblem(r, g, 1e6, 0.0)  # β → ∞: π_λ = π_ref
    pred = p.predict(0.0)
    assert abs(pred.reward_gain) < 1e-5 and pred.kl < 1e-9
    assert pred.ess_mean == pytest.approx(r.shape[1], rel=1e-6)
    pred = DualProblem(r, g, 0.01, 0.0).predict(0.0)
    assert 1 <= pred.ess_min <= pred.ess_mean <= r.shape[1]


@pytest.mark.parametrize("m", [1, 3])
def test_coarse_start_changes_nothing_but_the_path(m):
    """From N = 512 prompts the solver starts at λ* of every 8th prompt: same λ* as from 0."""
    from dualign.dual.solver import COARSE_MIN_PROMPTS, _coarse_start

    rng = np.random.default_rng(m)
    n, k = COARSE_MIN_PROMPTS, 16
    reward = rng.normal(size=(n, k))
    safety = 0.5 * reward[:, :, None] * -1 + rng.normal(size=(n, k, m))
    margins = 0.3 * DualProblem(reward, safety, 0.1, 0).max_gain()
    start, passes = _coarse_start(DualProblem(reward, safety, 0.1, margins))
    assert np.all(start > 0) and passes > 0  # the subsample's λ*, not 0
    a = solve_dual(reward, safety, 0.1, margins)
    b = solve_dual(reward, safety, 0.1, margins, lam0=np.zeros(m))
    np.testing.assert_allclose(a.lam, b.lam, rtol=1e-9, atol=1e-12)
    assert a.converged and a.history[0].tolist() == start.tolist()
    assert a.options["coarse_start_passes"] == passes and b.options["coarse_start_passes"] == 0


def test_coarse_start_falls_back_to_zero_when_the_subsample_cannot_reach_the_margin():
    from dualign.dual.solver import COARSE_MIN_PROMPTS, COARSE_STRIDE, _coarse_start

    n, k = COARSE_MIN_PROMPTS, 4
    rng = np.random.default_rng(0)
    reward = rng.normal(size=(n, k))
    safety = np.zeros((n, k))
    off = np.arange(n) % COARSE_STRIDE != 0
    safety[off] = rng.normal(size=(off.sum(), k))  # the every-8th subsample has no safety spread
    margin = 0.5 * DualProblem(reward, safety, 0.1, 0).max_gain()[0]
    assert np.all(_coarse_start(DualProblem(reward, safety, 0.1, margin))[0] == 0)
    res = solve_dual(reward, safety, 0.1, margin)
    assert res.converged and res.predicted.safety_gain[0] == pytest.approx(margin, abs=1e-8)


def test_dual_does_not_import_torch():
    import subprocess
    out = subprocess.run([sys.executable, "-c", "import dualign.dual, sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
