"""The pseudo-preference (soft-label DPO) loss of CAN and the labels it is trained on.

For a pair (x, y0, y1) with label p = P(y1 preferred over y0),

    Δ_θ = [log π_θ(y1|x) − log π_ref(y1|x)] − [log π_θ(y0|x) − log π_ref(y0|x)]
    ℓ   = −[ p log σ(β Δ_θ) + (1 − p) log σ(−β Δ_θ) ]

With p = σ(r(y1) − r(y0)) the population minimizer is π_θ ∝ π_ref exp(r/β) (docs/design.md §3):
each pair's loss is a cross-entropy between Bernoulli(p) and Bernoulli(σ(βΔ)), minimal
exactly when βΔ = r(y1) − r(y0). Labels in {0, 1} give plain DPO (the sigmoid loss).

An optional per-pair offset o ≥ 0 asks the preferred side to win by at least o in the logit,
ℓ = −[ p log σ(βΔ_θ − o) + (1 − p) log σ(−βΔ_θ − o) ]; with hard labels and o = Δ_safe·1{the
dispreferred answer is unsafe and the preferred one safe} this is SafeDPO's loss
(`dualign.pipelines.baselines.safedpo_pairs`).
"""
from __future__ import annotations

import numpy as np


def pseudo_preference_loss(policy_logp_1, policy_logp_0, ref_logp_1, ref_logp_0, labels,
                           beta: float, reduction: str = "mean", offset=None):
    """Soft-label DPO loss, −[p log σ(βΔ − o) + (1−p) log σ(−βΔ − o)] (o = 0 by default).

    Parameters
    ----------
    policy_logp_1, policy_logp_0 : torch.Tensor, shape (B,)
        log π_θ(y1|x) and log π_θ(y0|x), summed over response tokens.
    ref_logp_1, ref_logp_0 : torch.Tensor, shape (B,)
        The same under the reference policy (no gradient needed).
    labels : torch.Tensor, shape (B,)
        p ∈ [0, 1], the probability that y1 is preferred; {0, 1} is plain DPO.
    beta : float
        KL coefficient β > 0.
    reduction : {"mean", "none"}
        Average over the batch, or return the per-pair losses.
    offset : torch.Tensor, shape (B,), optional
        o ≥ 0 per pair, in logit units: the margin by which the preferred side must win
        (SafeDPO's Δ on pairs whose dispreferred answer is unsafe). None: 0.

    Returns
    -------
    torch.Tensor
        Scalar (mean) or shape (B,) (none), in the dtype of the inputs' promotion.

    Raises
    ------
    ValueError
        β <= 0 or an unknown reduction.
    """
    import torch.nn.functional as F

    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")
    delta = (policy_logp_1 - ref_logp_1) - (policy_logp_0 - ref_logp_0)
    z = beta * delta
    labels = labels.to(z.dtype)
    # logsigmoid is stable for any |z|; log(sigmoid(z)) underflows to -inf for z << 0
    o = 0.0 if offset is None else offset.to(z.dtype)
    losses = -(labels * F.logsigmoid(z - o) + (1.0 - labels) * F.logsigmoid(-z - o))
    return losses.mean() if reduction == "mean" else losses


def pseudo_preference_labels(score_1, score_0) -> np.ndarray:
    """Soft labels p = σ(score_1 − score_0): the probability that y1 beats y0 under the
    Bradley–Terry model of the (λ-combined) score.

    Parameters
    ----------
    score_1, score_0 : array_like, shape (n,)
        r_λ(x, y1) and r_λ(x, y0) (e.g. r + λᵀg).

    Returns
    -------
    numpy.ndarray, shape (n,), float64, in [0, 1].

    Raises
    ------
    ValueError
        Shapes differ or a score is not finite.
    """
    s1 = np.asarray(score_1, dtype=np.float64)
    s0 = np.asarray(score_0, dtype=np.float64)
    if s1.shape != s0.shape:
        raise ValueError(f"score_1 has shape {s1.shape} but score_0 has shape {s0.shape}")
    d = s1 - s0
    if not np.all(np.isfinite(d)):
        raise ValueError("scores must be finite")
    # σ(d) = exp(-logaddexp(0, -d)): no overflow for large |d|
    return np.exp(-np.logaddexp(0.0, -d))


def hard_labels(p, seed: int = 0) -> np.ndarray:
    """Bernoulli(p) draws, as the paper's code does before running ordinary DPO.

    Parameters
    ----------
    p : array_like, shape (n,)
        Soft labels in [0, 1].
    seed : int
        Seed of the draws (numpy PCG64), so a run is reproducible.

    Returns
    -------
    numpy.ndarray, shape (n,), float64, values in {0.0, 1.0}.

    Raises
    ------
    ValueError
        A label outside [0, 1] or not finite.
    """
    p = np.asarray(p, dtype=np.float64)
    if not np.all((p >= 0) & (p <= 1)):  # also rejects NaN
        raise ValueError("labels must lie in [0, 1]")
    rng = np.random.default_rng(seed)
    return (rng.random(p.shape) < p).astype(np.float64)
