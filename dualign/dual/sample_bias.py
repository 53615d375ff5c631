"""How far the K-sample prediction of π_λ is from what infinitely many samples would give.

The dual sees π_λ only as a reweighting of each prompt's K reference samples, w ∝ exp(z),
z = (r + λ·g)/β. The plug-in estimates of E_{π_λ}[r], E_{π_λ}[g] and KL(π_λ‖π_ref) are ratio
estimators, biased at order 1/K; the KL cannot exceed log K at all. The jackknife over each
prompt's samples estimates that bias: with θ̂ the estimate on all K samples and θ̂_(−j) the
one without sample j,

    bias ≈ (K − 1) · (mean_j θ̂_(−j) − θ̂)          θ̃ = θ̂ − bias (first-order corrected)

per prompt, then averaged over prompts (the prompt average is linear, so it needs no
correction). When the tilt is so strong that the weights rest on one sample per prompt, the
1/K expansion behind the jackknife fails too: the correction then shows that the prediction
moves a lot with one sample less, which is the honest signal, not a fix.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problem import DualProblem

# A correction that moves a prediction by more than half of it is outside the 1/K regime the
# jackknife's expansion assumes (at K = 2 it is exactly the plug-in value again: the estimate
# doubles): such a corrected value is reported, never used as the prediction that is checked.
MAX_TRUSTED_SHIFT = 0.5


def relative_shift(plug_in: float, corrected: float) -> float:
    """|corrected − plug_in| / |plug_in|: 0.1 means the prediction moves by 10% once its 1/K
    bias is removed. Values under 1e-9 in magnitude count as 1e-9 (a zero prediction moved by
    rounding is no shift)."""
    return float(abs(corrected - plug_in) / max(abs(plug_in), 1e-9))


def trusted_correction(plug_in: float, corrected: float | None) -> bool:
    """Whether a bias-corrected prediction stays within `MAX_TRUSTED_SHIFT` of its plug-in
    value (`relative_shift`). False when there is no corrected value (None)."""
    return corrected is not None and relative_shift(plug_in, corrected) <= MAX_TRUSTED_SHIFT


@dataclass(frozen=True)
class SampleBias:
    """Jackknife estimates of the K-sample bias of `DualProblem.predict` at one λ.

    Attributes
    ----------
    reward_gain, safety_gain, kl : float, numpy.ndarray (m,), float
        Plug-in predictions (as `DualProblem.predict`).
    reward_gain_corrected, safety_gain_corrected, kl_corrected : float, numpy.ndarray (m,), float
        Bias-corrected values θ̂ − bias (the KL clipped at 0).
    k : int
        Samples per prompt.
    """

    reward_gain: float
    safety_gain: np.ndarray
    kl: float
    reward_gain_corrected: float
    safety_gain_corrected: np.ndarray
    kl_corrected: float
    k: int

    def relative_shift(self) -> float:
        """The largest `relative_shift` over reward gain, safety gains and KL."""
        pairs = [(self.reward_gain, self.reward_gain_corrected), (self.kl, self.kl_corrected),
                 *zip(self.safety_gain, self.safety_gain_corrected)]
        return max(relative_shift(p, c) for p, c in pairs)

    def to_dict(self) -> dict:
        return {"reward_gain": float(self.reward_gain), "safety_gain": [float(v) for v in self.safety_gain],
                "kl": float(self.kl), "reward_gain_corrected": float(self.reward_gain_corrected),
                "safety_gain_corrected": [float(v) for v in self.safety_gain_corrected],
                "kl_corrected": float(self.kl_corrected), "k": int(self.k)}


def _tilted_moments(z, R, G):
    """Per prompt: E_w[r] (N,), E_w[g] (N, m), log mean_k exp(z) (N,) over the finite entries of z."""
    zmax = z.max(axis=1, keepdims=True)
    e = np.exp(np.maximum(z - zmax, -600.0))
    e[~np.isfinite(z)] = 0.0  # a left-out sample
    s = e.sum(axis=1)
    n_in = np.isfinite(z).sum(axis=1)
    er = np.einsum("nk,nk->n", e, R) / s
    eg = np.einsum("nk,nkm->nm", e, G) / s[:, None]
    lme = np.log(s / n_in) + zmax[:, 0]
    return er, eg, lme


def sample_bias(problem: DualProblem, lam) -> SampleBias:
    """Jackknife (leave one sample out per prompt) bias of the predicted gains and KL of π_λ.

    Parameters
    ----------
    problem : DualProblem
        The scores (N prompts × K samples; K >= 2, as `DualProblem` requires).
    lam : array_like, shape (m,)
        Multipliers λ >= 0 (e.g. λ*).

    Returns
    -------
    SampleBias

    Notes
    -----
    K passes over the (N, K) scores, each allocating a few (N, K) arrays; the (N, K, m) safety
    scores are never copied.
    """
    k = problem.k  # >= 2: `DualProblem` refuses fewer
    lam = np.asarray(lam, dtype=np.float64).reshape(problem.m)
    R, G, beta = problem.R, problem.G, problem.beta
    z = (R + np.einsum("nkm,m->nk", G, lam)) / beta

    def per_prompt(zz):
        er, eg, lme = _tilted_moments(zz, R, G)
        kl = (er + eg @ lam) / beta - lme  # KL(π_λ‖π_ref) on the kept samples, per prompt
        return er, eg, kl

    er, eg, kl = per_prompt(z)
    loo_r, loo_g, loo_kl = np.zeros_like(er), np.zeros_like(eg), np.zeros_like(kl)
    for j in range(k):
        zj = z.copy()
        zj[:, j] = -np.inf
        a, b, c = per_prompt(zj)
        loo_r += a / k
        loo_g += b / k
        loo_kl += c / k
    ref_r, ref_g = R.mean(axis=1), G.mean(axis=1)
    corr_r = er - (k - 1) * (loo_r - er)
    corr_g = eg - (k - 1) * (loo_g - eg)
    corr_kl = kl - (k - 1) * (loo_kl - kl)
    return SampleBias(reward_gain=float(np.mean(er - ref_r)), safety_gain=(eg - ref_g).mean(axis=0),
                      kl=float(max(kl.mean(), 0.0)), reward_gain_corrected=float(np.mean(corr_r - ref_r)),
                      safety_gain_corrected=(corr_g - ref_g).mean(axis=0),
                      kl_corrected=float(max(corr_kl.mean(), 0.0)), k=k)
