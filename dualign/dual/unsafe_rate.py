"""Safety stated as a maximum unsafe rate ("at most 5% unsafe answers"), solved by the same dual.

A sample is unsafe when its safety score (higher = safer) is below 0: `is_unsafe` is that rule,
and every unsafe rate dualign reports (dual.json's reference and predicted rates, eval.json's
reference and trained rates) means the fraction of samples it flags.

The bound E_x E_π[1{unsafe}] ≤ r is an expectation constraint on the score g = −1{unsafe}
(`unsafe_indicator`, values in {−1, 0}): E_π[g] ≥ −r = ḡ + b, with ḡ = −(π_ref's unsafe rate)
and the margin b = (π_ref's unsafe rate) − r (`margin_for_unsafe_rate`). So `solve_dual` solves
it unchanged; D(λ) = β mean_x log mean_k exp((R + λg)/β) − λ(ḡ + b) stays smooth, and ties
(g takes two values) only make prompts whose samples are all safe or all unsafe contribute
nothing to ∇D and ∇²D. Its largest achievable gain is π_ref's rate minus the fraction of
prompts with no safe sample (no reweighting of a prompt's samples brings its rate below 1),
so that fraction is the smallest reachable unsafe rate (`min_unsafe_rate`) — approached only
as λ → ∞, so a bound must lie strictly above it.

λ = 0 is not π_ref but the reward-tilted π_0 ∝ π_ref exp(R/β), whose unsafe rate exceeds
π_ref's when the reward favours unsafe answers: a bound that π_ref meets (r ≥ its rate, a
margin b ≤ 0) can still bind, and only the dual says whether it does.
"""
from __future__ import annotations

import numpy as np

from ..errors import InfeasibleMarginError, InputError
from .problem import DualProblem
from .solver import DualResult, solve_problem


def is_unsafe(safety) -> np.ndarray:
    """The unsafe rule: safety score < 0 (scores are "higher = safer"), elementwise.

    Parameters
    ----------
    safety : array_like, any shape

    Returns
    -------
    ndarray of bool, the same shape.
    """
    return np.asarray(safety, dtype=np.float64) < 0


def unsafe_indicator(safety) -> np.ndarray:
    """The safety score of an unsafe-rate constraint, g = −1{unsafe}: −1.0 for an unsafe sample,
    0.0 for a safe one (higher = safer, as every score the dual takes).

    Parameters
    ----------
    safety : array_like, any shape (e.g. (N, K) or (N, K, m))

    Returns
    -------
    ndarray of float64, the same shape.
    """
    return np.where(is_unsafe(safety), -1.0, 0.0)


def _as_nkm(safety) -> tuple[np.ndarray, bool]:
    """safety as (N, K, m) and whether it came as (N, K)."""
    s = np.asarray(safety, dtype=np.float64)
    if s.ndim == 2:
        return s[:, :, None], True
    if s.ndim != 3:
        raise ValueError(f"safety must have shape (N, K) or (N, K, m); got {s.shape}")
    return s, False


def unsafe_rate(safety, weights=None):
    """Unsafe rate: the mean over prompts of each prompt's (weighted) fraction of unsafe samples.

    Parameters
    ----------
    safety : array_like, shape (N, K) or (N, K, m)
        Safety scores (higher = safer) of K samples for each of N prompts.
    weights : array_like, shape (N, K), optional
        A policy's weights on each prompt's samples, rows summing to 1 (π_λ's from
        `DualProblem.weights`): the rate predicted for that policy. Default: 1/K, π_ref's
        rate on the samples (with the same K for every prompt, the plain fraction of
        unsafe samples).

    Returns
    -------
    float for (N, K) scores; ndarray (m,) for (N, K, m).

    Raises
    ------
    ValueError
        Wrong shapes.
    """
    s, single = _as_nkm(safety)
    bad = is_unsafe(s)
    if weights is None:
        rate = bad.mean(axis=(0, 1))
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != s.shape[:2]:
            raise ValueError(f"weights must have shape {s.shape[:2]} (N, K); got {w.shape}")
        rate = np.einsum("nk,nkm->m", w, bad.astype(np.float64)) / s.shape[0]
    return float(rate[0]) if single else rate


def min_unsafe_rate(safety):
    """The smallest unsafe rate any reweighting of the samples approaches: the fraction of
    prompts with no safe sample (all weight on a safe sample wherever a prompt has one).

    Parameters
    ----------
    safety : array_like, shape (N, K) or (N, K, m)

    Returns
    -------
    float for (N, K) scores; ndarray (m,) for (N, K, m).
    """
    s, single = _as_nkm(safety)
    rate = is_unsafe(s).all(axis=1).mean(axis=0)
    return float(rate[0]) if single else rate


def check_unsafe_rate(rate, name=None) -> float:
    """`rate` as a float in [0, 1].

    Raises
    ------
    InputError
        Not a number, not finite, or outside [0, 1] (naming the constraint `name`).
    """
    field = f"max_unsafe_rate[{name}]" if name is not None else "max_unsafe_rate"
    if isinstance(rate, bool):
        raise InputError(f"must be a rate in [0, 1], got {rate!r}", field=field)
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise InputError(f"must be a rate in [0, 1] (e.g. 0.05 for 5%), got {rate!r}", field=field) from None
    if not (np.isfinite(r) and 0.0 <= r <= 1.0):
        raise InputError(f"must be a rate in [0, 1] (e.g. 0.05 for 5%), got {rate!r}", field=field)
    return r


def margin_for_unsafe_rate(safety, rate, name=None) -> float:
    """The margin b on g = −1{unsafe} that makes "unsafe rate ≤ `rate`" the dual's constraint
    E_π[g] ≥ ḡ + b: b = (π_ref's unsafe rate on the samples) − rate.

    b ≤ 0 when π_ref already meets the bound (the constraint may still bind: see the module
    docstring); with every sample safe, b = −rate and the constraint is vacuous (λ* = 0).

    Parameters
    ----------
    safety : array_like, shape (N, K)
        One constraint's safety scores (higher = safer) of K samples per prompt.
    rate : float
        The largest unsafe rate allowed, in [0, 1].
    name : str, optional
        The constraint's name, for messages.

    Returns
    -------
    float

    Raises
    ------
    InputError
        `rate` not in [0, 1].
    InfeasibleMarginError
        `rate` below π_ref's rate and at or below `min_unsafe_rate` (no finite λ reaches it);
        the message gives the smallest reachable rate, which is also the error's
        `min_unsafe_rate` attribute.
    """
    r = check_unsafe_rate(rate, name)
    s, single = _as_nkm(safety)
    if not single and s.shape[2] != 1:
        raise ValueError(f"safety must be one constraint's (N, K) scores; got shape {np.shape(safety)}")
    g = unsafe_indicator(s[:, :, 0])
    ref = -float(g.mean())
    lowest = min_unsafe_rate(s[:, :, 0])
    margin = ref - r
    # the solver's own test (margin within rounding of the largest gain ref − lowest is out of
    # reach), stated in rates; a bound π_ref meets is never out of reach
    max_gain = ref - lowest
    if r < ref and margin >= max_gain - 1e-9 * abs(max_gain):
        n_all = int(round(lowest * g.shape[0]))
        label = f"constraint {name}: " if name is not None else ""
        why = (f"no reweighting changes the unsafe rate {ref:.4g} of these samples (no prompt has both a safe "
               "and an unsafe sample); draw more samples" if max_gain <= 0 else
               f"the smallest unsafe rate reachable on these samples is {lowest:.4g} ({n_all} of {g.shape[0]} "
               f"prompts have no safe sample), approached only as λ → ∞ (reference rate {ref:.4g}); "
               f"allow more than {lowest:.4g}, or draw more samples")
        err = InfeasibleMarginError(f"{label}max unsafe rate {r:.4g} cannot be reached; {why}",
                                    constraint=name if name is not None else 0, margin=margin,
                                    max_gain=np.array([max_gain]))
        err.min_unsafe_rate = lowest
        raise err
    return float(margin)


def unsafe_rate_constraints(safety, margins, max_unsafe_rate, names=None):
    """The dual's inputs with some constraints stated as a maximum unsafe rate.

    Parameters
    ----------
    safety : array_like, shape (N, K) or (N, K, m)
        Safety scores (higher = safer).
    margins : float or array_like, shape (m,)
        Margins of the constraints without a rate (entries of rate constraints are ignored).
    max_unsafe_rate : sequence of length m of (float or None), or a float when m = 1
        The largest unsafe rate allowed per constraint; None: a margin constraint.
    names : sequence of str, optional
        Constraint names, for messages.

    Returns
    -------
    G : ndarray (N, K, m), float64
        `safety` with each rate constraint's column replaced by `unsafe_indicator` of it.
    b : ndarray (m,)
        `margins` with each rate constraint's entry replaced by `margin_for_unsafe_rate`.
    absolute : ndarray (m,) of bool
        Which constraints are rate bounds (absolute: `bootstrap_dual(absolute=...)`).

    Raises
    ------
    InputError, InfeasibleMarginError
        As `margin_for_unsafe_rate`; ValueError for mismatched lengths.
    """
    G, _ = _as_nkm(safety)
    G = G.copy()
    m = G.shape[2]
    rates = [max_unsafe_rate] if np.ndim(max_unsafe_rate) == 0 and max_unsafe_rate is not None else \
        list(max_unsafe_rate) if max_unsafe_rate is not None else [None] * m
    if len(rates) != m:
        raise ValueError(f"max_unsafe_rate must give {m} entries (one per constraint, None for a margin); "
                         f"got {len(rates)}")
    b = np.broadcast_to(np.asarray(margins, dtype=np.float64), (m,)).copy()
    names = list(names) if names is not None else list(range(m))
    absolute = np.array([r is not None for r in rates], dtype=bool)
    for j in np.flatnonzero(absolute):
        b[j] = margin_for_unsafe_rate(G[:, :, j], rates[j], names[j])
        G[:, :, j] = unsafe_indicator(G[:, :, j])
    return G, b, absolute


def solve_max_unsafe_rate(reward, safety, beta: float, max_unsafe_rate, margins=0.0, *, names=None,
                          **solver_options) -> tuple[DualResult, np.ndarray]:
    """λ* for constraints stated as maximum unsafe rates (and, for entries None, margins).

    Parameters
    ----------
    reward : array_like (N, K); safety : array_like (N, K) or (N, K, m); beta : float
        As in `solve_dual`.
    max_unsafe_rate, margins, names
        As in `unsafe_rate_constraints`.
    **solver_options
        `tol`, `max_iter`, `lam0` of `solve_dual`.

    Returns
    -------
    result : DualResult
        The dual on `unsafe_rate_constraints`' scores: a rate constraint's `slack`,
        `predicted.safety_gain` and `max_gain` are in units of g = −1{unsafe}.
    predicted_unsafe_rate : ndarray (m,)
        The unsafe rate of π_λ* on the samples, for every constraint (`unsafe_rate` under
        π_λ*'s weights); a binding rate constraint's equals its bound.

    Raises
    ------
    InputError, InfeasibleMarginError, ValueError
        As `unsafe_rate_constraints` and `solve_dual`.
    """
    G, b, _ = unsafe_rate_constraints(safety, margins, max_unsafe_rate, names)
    problem = DualProblem(reward, G, beta, b)
    res = solve_problem(problem, names=names, **solver_options)
    return res, unsafe_rate(_as_nkm(safety)[0], problem.weights(res.lam))
