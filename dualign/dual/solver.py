"""Solve the CAN dual: λ* = argmin_{λ >= 0} D(λ), by projected Newton with a safeguarded line search.

D is smooth and convex with an exact Hessian that costs the same single pass over the
scores as its gradient, so Newton's method converges in a handful of passes to machine
precision; on many prompts it starts from λ* of a 1/8 subsample, where the damped first
steps cost 1/8 of a pass. Infeasible margins are detected before any iteration (one constraint at a
time) and during it (jointly), with a certificate instead of a huge λ.

Units: the dual is homogeneous. Dividing r, g, the margins b and β by the same c > 0 gives
D_c(λ) = D(λ)/c, so λ* is unchanged (and gains, slack and D scale by 1/c, KL and ESS not at
all). Scores of extreme magnitude (beyond 2^±32) are solved in units where they are O(1),
with c a power of two so the division is exact, and the result is mapped back.

A result is always converged. When Newton stops short, a linear program over the samples
(`DualProblem.max_joint_slack`) decides exactly whether the margins are reachable together:
not reachable (or only at the edge) → InfeasibleMarginError; reachable → DualNotConvergedError.
With m > 1 a converged π_λ* is itself the witness that the margins are met jointly (its slack
is within `tol` of them), so the LP, which costs seconds where Newton costs milliseconds at
10⁵ samples, runs only on failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import DualNotConvergedError, InfeasibleMarginError, InputError
from .problem import DualProblem, Prediction


@dataclass
class DualResult:
    """The solution of the dual and its certificate.

    Attributes
    ----------
    lam : ndarray, shape (m,)
        λ*, the optimal multipliers (exactly 0 for inactive constraints).
    converged : bool
        Whether the scaled KKT residual reached `tol`: always True for a result `solve_dual`
        returns (a solve that stops short raises instead).
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


def _check_margins(problem: DualProblem, names, unit: float = 1.0):
    """Raise for a margin out of reach; return (max_gain (m,), flat (m,) bool).

    `flat` marks constraints whose score is constant within every prompt (largest gain 0)
    and whose margin is 0: no reweighting moves such a score, so the constraint holds with
    equality for every λ (∇_j D ≡ 0 up to rounding) and λ_j* = 0; the solver keeps λ_j at 0
    rather than chase rounding noise. (An unsafe indicator on samples that are all safe.)
    `unit`: the scores' scale relative to the user's (see `score_unit`), for messages."""
    mg = problem.max_gain()
    # Within rounding of the edge counts as out of reach: λ* would be astronomically large.
    edge = mg - 1e-9 * np.abs(mg)
    flat = np.zeros(problem.m, dtype=bool)
    for j in range(problem.m):
        if problem.margins[j] >= edge[j]:
            col = problem.G[:, :, j]
            if problem.margins[j] <= 0 and np.array_equal(col.max(axis=1), col.min(axis=1)):
                flat[j] = True
                continue
            raise InfeasibleMarginError(
                f"constraint {names[j]}: margin {problem.margins[j] * unit:.6g} cannot be reached; the largest "
                f"achievable gain on these samples is {mg[j] * unit:.6g} (use a margin below it, or draw more "
                "samples)", constraint=names[j], margin=float(problem.margins[j] * unit), max_gain=mg * unit)
    return mg, flat


def _raise_joint(problem: DualProblem, lam, names, mg, unit: float = 1.0):
    active = [names[j] for j in np.flatnonzero(lam > 0)]
    raise InfeasibleMarginError(
        f"constraints {', '.join(map(str, active))}: margins {(problem.margins * unit).tolist()} cannot be met "
        f"together (each alone can: largest achievable gains {np.round(mg * unit, 6).tolist()}); "
        "the dual diverges along λ ∝ " + np.array2string(lam / np.abs(lam).max(), precision=3),
        constraint=active[0] if active else names[0], margin=float(problem.margins.max() * unit),
        max_gain=mg * unit)


COARSE_MIN_PROMPTS = 512  # below this a full pass is cheap: start from 0
COARSE_STRIDE = 8
UNIT_RANGE = 2.0 ** 32  # scores within [2^-32, 2^32] in magnitude are solved as they are
LP_TOL = 1e-6  # the LP's verdict t* (units of the largest gains) counts as > 0 above this; HiGHS is good to 1e-7


def score_unit(R, G, margins) -> float:
    """The power of two c that `solve_problem` divides r, g, b and β by: 1 when the largest
    magnitude among them lies within [2^-32, 2^32] (no copy, results bit for bit as given),
    else the power of two nearest it, so that the scaled scores are O(1): squares of scores
    near 1e200 (the Hessian) would overflow, and near 1e-200 underflow."""
    # max and -min rather than abs: no (N, K, m) temporary
    s = max(float(R.max()), -float(R.min()), float(G.max()), -float(G.min()),
            float(np.max(np.abs(margins), initial=0.0)))
    if s == 0.0 or 1.0 / UNIT_RANGE <= s <= UNIT_RANGE:
        return 1.0
    return float(2.0 ** round(np.log2(s)))


def _coarse_start(problem: DualProblem) -> tuple[np.ndarray, int]:
    """A starting point: λ* of the same dual on every COARSE_STRIDE-th prompt, else 0;
    and the passes over the subsample that took (each 1/COARSE_STRIDE of a full pass).

    Newton's first steps from λ = 0 overshoot and are damped back, each costing a full
    pass; on a 1/8 subsample those steps cost 1/8, and from their λ the full problem
    needs only the last, quadratically convergent steps. The answer does not depend on
    the start (D is convex; the full problem is solved to `tol` either way), so the
    subsample's λ is used even when it stopped short of its loose tolerance."""
    if problem.n < COARSE_MIN_PROMPTS:
        return np.zeros(problem.m), 0
    sub = DualProblem(problem.R[::COARSE_STRIDE], problem.G[::COARSE_STRIDE], problem.beta, problem.margins)
    try:
        return _newton(sub, tol=1e-4, max_iter=30, lam0=np.zeros(problem.m), names=None).lam, sub.n_evals
    except InfeasibleMarginError:  # reachable on all prompts but not on the subsample
        return np.zeros(problem.m), sub.n_evals


def _newton(problem: DualProblem, *, tol: float, max_iter: int, lam0, names, unit: float = 1.0) -> DualResult:
    """Projected Newton on `problem` as it is (no rescaling); the result may be unconverged.

    Raises
    ------
    InfeasibleMarginError
        A margin out of reach alone, or a divergence along a direction of negative recession
        slope (a certificate that the margins cannot be met together)."""
    m = problem.m
    names = list(names) if names is not None else list(range(m))
    mg, flat = _check_margins(problem, names, unit)
    # Slack is measured in units of the largest achievable gain: scale-free, and meaningful.
    scale = np.where(mg > 0, mg, 1.0)

    coarse_passes = 0
    if lam0 is None:
        lam0, coarse_passes = _coarse_start(problem)
    lam = np.maximum(np.asarray(lam0, dtype=np.float64).reshape(m), 0)
    lam[flat] = 0.0  # a flat constraint's λ_j changes nothing: 0 is its minimal-norm optimum
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
        free = ((lam > 0) | (g < 0)) & ~flat
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
                _raise_joint(problem, lam, names, mg, unit)
    else:
        converged = _kkt(lam, g, scale)[1] <= tol
        if not converged and np.linalg.norm(lam) > 0 and problem.recession_slope(lam / np.linalg.norm(lam)) < 0:
            _raise_joint(problem, lam, names, mg, unit)

    kkt, scaled = _kkt(lam, g, scale)
    return DualResult(lam=lam, converged=converged, iterations=it, n_evals=problem.n_evals,
                      kkt_residual=kkt, scaled_kkt_residual=scaled, value=val, slack=g,
                      predicted=problem.predict(lam), beta=problem.beta, margins=problem.margins.copy(),
                      max_gain=mg, history=history,
                      options={"method": "projected-newton", "tol": tol, "max_iter": max_iter,
                               "coarse_start_passes": coarse_passes})


def _in_user_units(res: DualResult, problem: DualProblem, c: float) -> DualResult:
    """`res`, solved on `problem` divided by c, in `problem`'s units: λ, KL, ESS, the scaled
    residual and the history as they are; D, residual, slack, gains and rewards times c."""
    p = res.predicted
    pred = Prediction(reward=p.reward * c, reward_gain=p.reward_gain * c, safety_gain=p.safety_gain * c,
                      kl=p.kl, ess_mean=p.ess_mean, ess_min=p.ess_min, ess_median=p.ess_median,
                      ess_fraction=p.ess_fraction)
    return DualResult(lam=res.lam, converged=res.converged, iterations=res.iterations, n_evals=problem.n_evals,
                      kkt_residual=res.kkt_residual * c, scaled_kkt_residual=res.scaled_kkt_residual,
                      value=res.value * c, slack=res.slack * c, predicted=pred, beta=problem.beta,
                      margins=problem.margins.copy(), max_gain=res.max_gain * c, history=res.history,
                      options={**res.options, "score_unit": c})


def _not_converged(problem: DualProblem, res: DualResult, names, tol: float, unit: float):
    """Raise for a Newton run `res` that stopped short: InfeasibleMarginError when the LP over
    the samples finds the margins out of joint reach (or reachable only at the edge, t* <=
    LP_TOL), else DualNotConvergedError. `problem` in solver units, `unit` for messages."""
    names = list(names) if names is not None else list(range(problem.m))
    mg = res.max_gain
    try:
        # constraints constant within every prompt (largest gain 0) passed `_check_margins`, so
        # their margin is <= 0: met by every p, and left out (a margin of exactly 0 would pin t* at 0)
        t = problem.max_joint_slack(mg > 0)
    except ArithmeticError as e:
        t = None
        why = f"and whether the margins are reachable could not be decided ({e})"
    if t is not None and t <= LP_TOL:
        gains = np.round(mg * unit, 6).tolist()
        why = (f"the best reweighting of the samples falls short of them by {-t:.3g} × their largest achievable "
               f"gains {gains}" if t < -LP_TOL else
               f"the best reweighting of the samples meets them with no room to spare (largest achievable gains "
               f"{gains}), which π_λ, giving every sample weight, approaches only as λ → ∞")
        together, alone = (" together", "; each margin alone can be") if problem.m > 1 else ("", "")
        raise InfeasibleMarginError(
            f"constraints {', '.join(map(str, names))}: margins {np.round(problem.margins * unit, 6).tolist()} "
            f"cannot be met{together}: by a linear program over the samples, {why}{alone}; "
            "lower the margins, or draw more samples",
            constraint=names[int(np.argmax(problem.margins / np.where(mg > 0, mg, 1.0)))],
            margin=float(problem.margins.max() * unit), max_gain=mg * unit)
    if t is not None:
        why = (f"although the margins are reachable (by a linear program over the samples, a reweighting meets "
               f"them with {t:.3g} × their largest achievable gains to spare)")
    spread = max(float(problem.R.std(axis=1).mean()), float(problem.G.std(axis=1).mean()))
    hint = (f"β = {problem.beta * unit:.3g} is {spread / problem.beta:.3g} times smaller than the scores' spread "
            "within a prompt, so the tilt is nearly one-hot: use a larger β" if spread > 1e6 * problem.beta
            else "raise max_iter or loosen tol")
    raise DualNotConvergedError(
        f"the dual did not converge in {res.iterations} Newton steps (scaled KKT residual "
        f"{res.scaled_kkt_residual:.3g} > tol {tol:g}) {why}; {hint}",
        lam=res.lam, kkt_residual=res.scaled_kkt_residual, iterations=res.iterations)


def solve_problem(problem: DualProblem, *, tol: float = 1e-10, max_iter: int = 100,
                  lam0=None, names=None, unit: float | None = None) -> DualResult:
    """Minimize `problem`'s D over λ >= 0. See `solve_dual` for the parameters and errors.

    `unit`: the power of two to solve in (`score_unit`; default: from the scores), so a
    caller solving many resamples of one table computes it once."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise InputError(f"must be an integer >= 1; got {max_iter!r}", field="max_iter")
    if not (isinstance(tol, (int, float, np.floating)) and np.isfinite(tol) and tol > 0):
        raise InputError(f"must be a finite number > 0; got {tol!r}", field="tol")
    c = score_unit(problem.R, problem.G, problem.margins) if unit is None else float(unit)
    work = problem if c == 1.0 else DualProblem(problem.R / c, problem.G / c, problem.beta / c, problem.margins / c)
    res = _newton(work, tol=tol, max_iter=max_iter, lam0=lam0, names=names, unit=c)
    if not res.converged:
        _not_converged(work, res, names, tol, c)
    if work is not problem:
        problem.n_evals += work.n_evals
        res = _in_user_units(res, problem, c)
    return res


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
    InputError
        (a ValueError) Bad inputs, naming the field: non-finite scores, shape mismatch, K < 2,
        β not a finite number > 0, margins not finite, tol <= 0, max_iter < 1.
    InfeasibleMarginError
        A margin at or beyond the largest achievable gain, or margins not reachable jointly
        (a recession direction of the dual, or the linear program of
        `DualProblem.max_joint_slack` when Newton stops short).
    DualNotConvergedError
        Newton stopped short of `tol` within `max_iter` steps although the margins are
        reachable (e.g. β tiny next to the scores' spread). A non-converged λ is never
        returned.

    Notes
    -----
    Scores of any magnitude are solved: beyond 2^±32 they are divided by a power of two
    first (`score_unit`), which leaves λ* unchanged (see the module docstring).
    """
    return solve_problem(DualProblem(reward, safety, beta, margins), tol=tol, max_iter=max_iter,
                         lam0=lam0, names=names)
