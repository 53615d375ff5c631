"""Solve the CAN dual: λ* = argmin_{λ >= 0} D(λ), by projected Newton with a safeguarded line search.

D is smooth and convex with an exact Hessian that costs the same single pass over the
scores as its gradient, so Newton's method converges in a handful of passes to machine
precision; on many prompts it starts from λ* of a 1/8 subsample, where the damped first
steps cost 1/8 of a pass. Infeasible margins are detected before any iteration (one constraint at a
time) and during it (jointly), with a certificate instead of a huge λ.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InfeasibleMarginError
from .problem import DualProblem, Prediction


@dataclass
class DualResult:
    """The solution of the dual and its certificate.

    Attributes
    ----------
    lam : ndarray, shape (m,)
        λ*, the optimal multipliers (exactly 0 for inactive constraints).
    converged : bool
        Whether the scaled KKT residual reached `tol`.
    iterations : int
        Newton iterations taken.
    n_evals : int
        Passes over the score arrays (the unit of cost).
    kkt_residual : float
        ‖min(λ, ∇D(λ))‖∞ in safety-score units.
    scaled_kkt_residual : float
        The same residual with each constraint's slack divided by its largest achievable
        gain: scale-free, what `tol` is compared with.
    value : float
        D(λ*).
    slack : ndarray, shape (m,)
        ∇D(λ*) = predicted E_{π_λ*}[g] − ḡ − b (0 for active constraints, ≥ 0 for inactive).
    predicted : Prediction
        What π_λ* is predicted to do (reward, safety gains, KL, ESS).
    max_gain : ndarray, shape (m,)
        Largest achievable gain per constraint on this sample.
    history : list of ndarray
        λ after every iteration, starting with the initial point.
    """

    lam: np.ndarray
    converged: bool
    iterations: int
    n_evals: int
    kkt_residual: float
    scaled_kkt_residual: float
    value: float
    slack: np.ndarray
    predicted: Prediction
    beta: float
    margins: np.ndarray
    max_gain: np.ndarray
    history: list = field(default_factory=list, repr=False)
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "lambda": self.lam.tolist(), "beta": self.beta, "margins": self.margins.tolist(),
            "converged": bool(self.converged), "iterations": self.iterations,
            "n_evals": self.n_evals, "kkt_residual": self.kkt_residual,
            "scaled_kkt_residual": self.scaled_kkt_residual, "value": self.value,
            "slack": self.slack.tolist(), "max_gain": self.max_gain.tolist(),
            "predicted": self.predicted.to_dict(),
            "history": [h.tolist() for h in self.history], "solver": dict(self.options),
        }


def _kkt(lam, grad, scale):
    r = np.minimum(lam, grad)
    # At λ_j = 0 only a negative slack violates KKT; at λ_j > 0 any slack does.
    scaled = np.where(lam > 0, np.abs(grad), np.maximum(-grad, 0.0)) / scale
    return float(np.max(np.abs(r))), float(np.max(scaled))


def _check_margins(problem: DualProblem, names):
    mg = problem.max_gain()
    # Within rounding of the edge counts as out of reach: λ* would be astronomically large.
    edge = mg - 1e-9 * np.abs(mg)
    for j in range(problem.m):
        if problem.margins[j] >= edge[j]:
            raise InfeasibleMarginError(
                f"constraint {names[j]}: margin {problem.margins[j]:.6g} cannot be reached; the largest "
                f"achievable gain on these samples is {mg[j]:.6g} (use a margin below it, or draw more samples)",
                constraint=names[j], margin=float(problem.margins[j]), max_gain=mg)
    return mg


def _raise_joint(problem: DualProblem, lam, names, mg):
    active = [names[j] for j in np.flatnonzero(lam > 0)]
    raise InfeasibleMarginError(
        f"constraints {', '.join(map(str, active))}: margins {problem.margins.tolist()} cannot be met "
        f"together (each alone can: largest achievable gains {np.round(mg, 6).tolist()}); "
        "the dual diverges along λ ∝ " + np.array2string(lam / np.abs(lam).max(), precision=3),
        constraint=active[0] if active else names[0], margin=float(problem.margins.max()), max_gain=mg)


COARSE_MIN_PROMPTS = 512  # below this a full pass is cheap: start from 0
COARSE_STRIDE = 8


def _coarse_start(problem: DualProblem) -> tuple[np.ndarray, int]:
    """A starting point: λ* of the same dual on every COARSE_STRIDE-th prompt, else 0;
    and the passes over the subsample that took (each 1/COARSE_STRIDE of a full pass).

    Newton's first steps from λ = 0 overshoot and are damped back, each costing a full
    pass; on a 1/8 subsample those steps cost 1/8, and from their λ the full problem
    needs only the last, quadratically convergent steps. The answer does not depend on
    the start (D is convex; the full problem is solved to `tol` either way)."""
    if problem.n < COARSE_MIN_PROMPTS:
        return np.zeros(problem.m), 0
    sub = DualProblem(problem.R[::COARSE_STRIDE], problem.G[::COARSE_STRIDE], problem.beta, problem.margins)
    try:
        return solve_problem(sub, tol=1e-4, max_iter=30, lam0=np.zeros(problem.m)).lam, sub.n_evals
    except InfeasibleMarginError:  # reachable on all prompts but not on the subsample
        return np.zeros(problem.m), sub.n_evals


def solve_problem(problem: DualProblem, *, tol: float = 1e-10, max_iter: int = 100,
                  lam0=None, names=None) -> DualResult:
    """Minimize `problem`'s D over λ >= 0. See `solve_dual` for the parameters."""
    m = problem.m
    names = list(names) if names is not None else list(range(m))
    mg = _check_margins(problem, names)
    # Slack is measured in units of the largest achievable gain: scale-free, and meaningful.
    scale = np.where(mg > 0, mg, 1.0)

    coarse_passes = 0
    if lam0 is None:
        lam0, coarse_passes = _coarse_start(problem)
    lam = np.maximum(np.asarray(lam0, dtype=np.float64).reshape(m), 0)
    val, g, _ = problem.evaluate(lam, hessian=False)
    history = [lam.copy()]
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        if _kkt(lam, g, scale)[1] <= tol:
            converged, it = True, it - 1
            break
        # the Hessian only where a step is taken (the tilt of λ is cached: no extra pass)
        H = problem.hessian(lam)
        # Bound-constrained Newton (Bertsekas): variables at 0 pushed outward stay at 0; the
        # Newton system is solved on the free ones, regularized where the tilt has collapsed
        # onto one sample per prompt and the Hessian is nearly singular.
        free = (lam > 0) | (g < 0)
        d = np.zeros(m)
        Hf = H[np.ix_(free, free)]
        reg = 1e-12 * max(np.trace(Hf) / max(free.sum(), 1), 1e-300)
        try:
            d[free] = -np.linalg.solve(Hf + reg * np.eye(free.sum()), g[free])
        except np.linalg.LinAlgError:
            d[free] = -g[free]
        if not np.all(np.isfinite(d)) or g @ d >= 0:
            d = -g  # Hessian useless here: fall back to steepest descent
        # Backtracking on the projection arc λ(t) = max(λ + t·d, 0) with the Armijo test.
        t = 1.0
        while True:
            new = np.maximum(lam + t * d, 0.0)
            nval, ng, _ = problem.evaluate(new, hessian=False)
            if nval <= val + 1e-4 * (g @ (new - lam)) or np.allclose(new, lam, rtol=1e-15, atol=0):
                break
            t *= 0.5 if t > 1e-3 else 0.1
            if t < 1e-20:
                break
        lam, val, g = new, nval, ng
        history.append(lam.copy())
        # Divergence: λ growing along a direction of negative recession slope means the
        # margins are jointly unreachable; checked only once λ is large, so feasible
        # problems pay nothing for it.
        if it >= 8 and not converged and np.linalg.norm(lam) > 0:
            if problem.recession_slope(lam / np.linalg.norm(lam)) < 0:
                _raise_joint(problem, lam, names, mg)
    else:
        converged = _kkt(lam, g, scale)[1] <= tol
        if not converged and np.linalg.norm(lam) > 0 and problem.recession_slope(lam / np.linalg.norm(lam)) < 0:
            _raise_joint(problem, lam, names, mg)

    kkt, scaled = _kkt(lam, g, scale)
    return DualResult(lam=lam, converged=converged, iterations=it, n_evals=problem.n_evals,
                      kkt_residual=kkt, scaled_kkt_residual=scaled, value=val, slack=g,
                      predicted=problem.predict(lam), beta=problem.beta, margins=problem.margins.copy(),
                      max_gain=mg, history=history,
                      options={"method": "projected-newton", "tol": tol, "max_iter": max_iter,
                               "coarse_start_passes": coarse_passes})


def solve_dual(reward, safety, beta: float = 0.1, margins=0.0, *, tol: float = 1e-10,
               max_iter: int = 100, lam0=None, names=None) -> DualResult:
    """Find the optimal multipliers λ* of the safety-constrained alignment problem.

    Parameters
    ----------
    reward : array_like, shape (N, K)
        Rewards of K reference samples for each of N prompts.
    safety : array_like, shape (N, K) or (N, K, m)
        Safety scores (higher = safer) of the same samples.
    beta : float
        KL coefficient β > 0.
    margins : float or array_like, shape (m,)
        Required gain of each constraint's mean safety over the reference's.
    tol : float
        Target for the scale-free KKT residual (slack in units of each constraint's largest
        achievable gain).
    max_iter : int
        Newton iterations allowed.
    lam0 : array_like, shape (m,), optional
        Starting point (a previous λ* makes bootstraps and sweeps cheap). Default: λ* on
        every 8th prompt when N ≥ 512, else 0.
    names : sequence of str, optional
        Constraint names used in error messages.

    Returns
    -------
    DualResult

    Raises
    ------
    ValueError
        Bad inputs (non-finite scores, shape mismatch, K < 2, β <= 0).
    InfeasibleMarginError
        A margin at or beyond the largest achievable gain, or margins not reachable jointly.
    """
    return solve_problem(DualProblem(reward, safety, beta, margins), tol=tol, max_iter=max_iter,
                         lam0=lam0, names=names)
