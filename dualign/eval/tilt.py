"""Did the training learn the tilt? The trained model seen through the dual's own lens.

The dual predicts π_λ* by reweighting π_ref's K samples of each prompt with
w ∝ exp(r_λ/β) (self-normalized importance sampling; docs/design.md §2). The trained model
π_θ can be looked at the same way, on the same samples: its weights are w ∝ π_θ/π_ref. Two
numbers follow, both measured on π_ref's samples of the held-out prompts:

- the *slope* of the trained model's log-ratio log π_θ/π_ref on the target log-ratio r_λ/β,
  within each prompt (both centered per prompt, since each is known only up to a per-prompt
  constant): 1 when π_θ = π_λ*, 0 when the training learned nothing of the tilt;
- the *reweighted gains*: π_ref's samples reweighted by π_θ/π_ref, the importance-sampling
  estimate of π_θ's gains from the samples the prediction was made on.

They split a miss in two: prediction → reweighted (the training did not learn the tilt on
these prompts) and reweighted → achieved on the model's own samples (π_θ went where π_ref's K
samples do not reach, so no reweighting of them describes it: a large KL, a small effective
sample size).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LearnedTilt:
    """How much of the target tilt a trained model carries (`learned_tilt`).

    Attributes
    ----------
    n_prompts, n_samples_per_prompt : int
        π_ref's samples it was measured on.
    slope : float
        Least-squares slope of the within-prompt centered log π_θ/π_ref on the centered
        r_λ/β (1: π_θ = π_λ* on these samples; 0: no tilt learned). Dimensionless.
    slope_ci : tuple of float, (lo, hi)
        Percentile bootstrap over prompts.
    correlation : float
        Pearson correlation of the same centered quantities (how cleanly, whatever the size).
    reweighted_reward_gain : float
        Σ_k w_k r_k − mean_k r_k averaged over prompts, w ∝ π_θ/π_ref: π_θ's reward gain as
        seen on π_ref's samples, reward units.
    reweighted_safety_gain : dict str -> float
        The same for each safety score.
    ess_mean : float
        Mean effective sample size (Σw)²/Σw² of those weights per prompt, 1 to K: how many of
        π_ref's samples the estimate rests on.
    """

    n_prompts: int
    n_samples_per_prompt: int
    slope: float
    slope_ci: tuple
    correlation: float
    reweighted_reward_gain: float
    reweighted_safety_gain: dict
    ess_mean: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["slope_ci"] = list(self.slope_ci)
        return d


def _slope(lc: np.ndarray, tc: np.ndarray) -> float:
    den = float(np.sum(tc * tc))
    return float(np.sum(lc * tc) / den) if den > 0 else float("nan")


def learned_tilt(logratio, target, reward, safety, safety_names, *, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> LearnedTilt:
    """Measure how much of the tilt r_λ/β a trained model learned, on π_ref's samples.

    Parameters
    ----------
    logratio : array_like, shape (N, K)
        log π_θ(y|x) − log π_ref(y|x) of π_ref's K samples of each of N prompts, nats.
    target : array_like, shape (N, K)
        r_λ(x, y)/β of the same samples: log π_λ*/π_ref up to a per-prompt constant.
    reward : array_like, shape (N, K)
    safety : array_like, shape (N, K, m)
        The scores whose reweighted gains are reported.
    safety_names : list of str, length m
    n_boot : int
        Bootstrap replicates over prompts for `slope_ci`.
    level : float
        Confidence level of `slope_ci`.
    seed : int
        Seed of the bootstrap.

    Returns
    -------
    LearnedTilt

    Raises
    ------
    ValueError
        Shapes disagree, K < 2, or a value is not finite.
    """
    lr = np.asarray(logratio, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    r = np.asarray(reward, dtype=np.float64)
    g = np.asarray(safety, dtype=np.float64)
    if lr.ndim != 2 or t.shape != lr.shape or r.shape != lr.shape or g.shape[:2] != lr.shape or g.ndim != 3:
        raise ValueError(f"logratio, target, reward must be (N, K) and safety (N, K, m); got {lr.shape}, "
                         f"{t.shape}, {r.shape}, {g.shape}")
    if g.shape[2] != len(safety_names):
        raise ValueError(f"{g.shape[2]} safety columns but {len(safety_names)} names")
    n, k = lr.shape
    if k < 2:
        raise ValueError(f"a tilt needs at least 2 samples per prompt, got {k}")
    if not all(np.all(np.isfinite(a)) for a in (lr, t, r, g)):
        raise ValueError("log-ratios, targets and scores must be finite")
    lc = lr - lr.mean(axis=1, keepdims=True)
    tc = t - t.mean(axis=1, keepdims=True)
    # self-normalized weights w ∝ π_θ/π_ref per prompt (max subtracted: exp never overflows)
    e = np.exp(lc - lc.max(axis=1, keepdims=True))
    w = e / e.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    boots = [_slope(lc[rows], tc[rows]) for rows in (rng.integers(0, n, size=n) for _ in range(n_boot))]
    q = [(1 - level) / 2, (1 + level) / 2]
    den = float(np.sqrt(np.sum(lc * lc) * np.sum(tc * tc)))
    gain = lambda s: float(np.mean(np.sum(w * s, axis=1) - s.mean(axis=1)))  # noqa: E731
    return LearnedTilt(
        n_prompts=int(n), n_samples_per_prompt=int(k), slope=_slope(lc, tc),
        slope_ci=tuple(float(v) for v in np.nanquantile(boots, q)) if n_boot else (float("nan"),) * 2,
        correlation=float(np.sum(lc * tc) / den) if den > 0 else float("nan"),
        reweighted_reward_gain=gain(r),
        reweighted_safety_gain={name: gain(g[:, :, j]) for j, name in enumerate(safety_names)},
        ess_mean=float(np.mean(1.0 / np.sum(w * w, axis=1))))


def learned_tilt_line(t: LearnedTilt, predicted: dict | None = None, where: str = "held-out") -> str:
    """One line for the evaluation log and report: the slope with its CI and the reweighted
    gains, each next to π_λ*'s on the same samples where `predicted` (score name → the
    prediction on those samples; the reward under "reward") has it. `where` names the prompts
    ("held-out", "training")."""
    predicted = predicted or {}
    gains = {"reward": t.reweighted_reward_gain, **t.reweighted_safety_gain}
    parts = [f"{c} {v:+.3f}" + (f" (π_λ*: {predicted[c]:+.3f})" if predicted.get(c) is not None else "")
             for c, v in gains.items()]
    return (f"tilt learned, on π_ref's {t.n_samples_per_prompt} samples of each of the {t.n_prompts} {where} "
            f"prompts: slope of log π_θ/π_ref on r_λ/β {t.slope:.3f} [{t.slope_ci[0]:.3f}, {t.slope_ci[1]:.3f}] "
            f"(1: π_λ*, 0: no tilt), correlation {t.correlation:.2f}; those samples reweighted by π_θ/π_ref "
            f"(effective {t.ess_mean:.1f} of {t.n_samples_per_prompt}): " + ", ".join(parts))


def learned_tilt_from_dict(d: dict) -> LearnedTilt:
    """The inverse of `LearnedTilt.to_dict` (eval.json's `learned_tilt`)."""
    return LearnedTilt(**{**d, "slope_ci": tuple(d["slope_ci"])})
