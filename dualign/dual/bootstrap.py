"""Bootstrap confidence intervals for λ* and for every prediction, by resampling prompts."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DualNotConvergedError, InfeasibleMarginError, InputError
from .problem import DualProblem, validate_scores
from .solver import DualResult, score_unit, solve_problem

# The quantities whose intervals are reported, read off a DualResult.
_FIELDS = {
    "lambda": lambda r: r.lam,
    "reward": lambda r: np.atleast_1d(r.predicted.reward),
    "reward_gain": lambda r: np.atleast_1d(r.predicted.reward_gain),
    "safety_gain": lambda r: r.predicted.safety_gain,
    "kl": lambda r: np.atleast_1d(r.predicted.kl),
    "ess_mean": lambda r: np.atleast_1d(r.predicted.ess_mean),
}


@dataclass
class BootstrapResult:
    """Percentile bootstrap intervals.

    Attributes
    ----------
    estimate : DualResult
        The solution on the full sample.
    ci : dict[str, ndarray]
        For each of 'lambda', 'reward', 'reward_gain', 'safety_gain', 'kl', 'ess_mean' an
        array of shape (d, 2) of (low, high), d = m for 'lambda' and 'safety_gain', else 1.
    replicates : dict[str, ndarray]
        The raw replicate values, shape (B_ok, d).
    level : float
        Confidence level, e.g. 0.95.
    n_boot : int
        Replicates drawn.
    n_infeasible : int
        Replicates where the margins were out of reach (left out of the intervals; a large
        count means the margin sits near the edge of what the samples support).
    n_not_converged : int
        Replicates whose solve stopped short (`DualNotConvergedError`), left out of the
        intervals too: an unconverged λ is never counted as a result.
    """

    estimate: DualResult
    ci: dict
    replicates: dict
    level: float
    n_boot: int
    n_infeasible: int
    seed: int
    n_not_converged: int = 0

    def to_dict(self) -> dict:
        d = {"level": self.level, "n_boot": self.n_boot, "n_infeasible": self.n_infeasible,
             "seed": self.seed, "ci": {k: v.tolist() for k, v in self.ci.items()}}
        if self.n_not_converged:  # absent when 0, so records of clean runs are as before
            d["n_not_converged"] = self.n_not_converged
        return d


def bootstrap_dual(reward, safety, beta: float = 0.1, margins=0.0, *, n_boot: int = 1000,
                   level: float = 0.95, seed: int = 0, names=None, progress: bool = False,
                   absolute=None, **solver_options) -> BootstrapResult:
    """Solve the dual, then re-solve it on `n_boot` resamples of the prompts.

    Parameters
    ----------
    reward, safety, beta, margins
        As in `solve_dual`.
    n_boot : int
        Bootstrap replicates (≥ 1).
    level : float
        Confidence level of the percentile intervals, in (0, 1).
    seed : int
        Seed of the resampling (≥ 0); the same seed gives the same intervals.
    progress : bool
        Show a progress bar.
    absolute : array_like of bool, shape (m,), optional
        Constraints whose bound is absolute, E_π[g] ≥ ḡ + b with ḡ the *full* sample's mean
        (a maximum unsafe rate: E_π[−1{unsafe}] ≥ −r), held fixed in every replicate; the
        others (default: all) keep their margin b over each replicate's own reference mean.

    Returns
    -------
    BootstrapResult

    Raises
    ------
    InputError
        (a ValueError) `n_boot` not an integer >= 1, `level` not in (0, 1), `seed` not an
        integer >= 0, or bad scores (as `solve_dual`).
    InfeasibleMarginError, DualNotConvergedError
        As `solve_dual`, for the full sample (replicates that fail are counted, not raised).
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"must be an integer >= 1; got {n_boot!r}", field="n_boot")
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0 < level < 1:
        raise InputError(f"must be in (0, 1), e.g. 0.95; got {level!r}", field="level")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"must be an integer >= 0; got {seed!r}", field="seed")
    R, G, beta, b = validate_scores(reward, safety, beta, margins)
    absolute = np.zeros(G.shape[2], dtype=bool) if absolute is None else \
        np.broadcast_to(np.asarray(absolute, dtype=bool), (G.shape[2],))
    g_full = G.mean(axis=(0, 1))
    unit = score_unit(R, G, b)  # once: every replicate's scores are drawn from these
    estimate = solve_problem(DualProblem(R, G, beta, b), names=names, unit=unit, **solver_options)
    rng = np.random.default_rng(seed)
    reps = {k: [] for k in _FIELDS}
    n_infeasible = n_not_converged = 0
    it = range(n_boot)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="bootstrap", unit="rep")
    for _ in it:
        idx = rng.integers(0, R.shape[0], size=R.shape[0])
        G_rep = G[idx]
        # an absolute bound is the same number in every replicate: its margin over the
        # replicate's reference mean moves with that mean
        b_rep = np.where(absolute, b + g_full - G_rep.mean(axis=(0, 1)), b) if absolute.any() else b
        try:
            res = solve_problem(DualProblem(R[idx], G_rep, beta, b_rep), names=names,
                                lam0=estimate.lam, unit=unit, **solver_options)
        except InfeasibleMarginError:
            n_infeasible += 1
            continue
        except DualNotConvergedError:
            n_not_converged += 1
            continue
        for k, f in _FIELDS.items():
            reps[k].append(f(res))
    alpha = (1 - level) / 2
    replicates, ci = {}, {}
    for k, v in reps.items():
        arr = np.array(v) if v else np.full((0, len(_FIELDS[k](estimate))), np.nan)
        replicates[k] = arr
        ci[k] = (np.stack([np.quantile(arr, alpha, axis=0), np.quantile(arr, 1 - alpha, axis=0)], axis=1)
                 if len(arr) else np.full((arr.shape[1], 2), np.nan))
    return BootstrapResult(estimate=estimate, ci=ci, replicates=replicates, level=level,
                           n_boot=n_boot, n_infeasible=n_infeasible, seed=seed,
                           n_not_converged=n_not_converged)
