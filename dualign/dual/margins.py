"""The map between margins and multipliers, both ways.

The paper's table goes from a chosen λ to the margin it implies; users usually start from
the margin they want. Both are exact on the sample: margin(λ) = E_{π_λ}[g] − ḡ, and
λ(margin) = argmin_{λ>=0} D(λ; margin).
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .problem import DualProblem, validate_scores
from .solver import solve_problem


def margin_for_lambda(reward, safety, beta: float, lam) -> np.ndarray:
    """Predicted safety gain of π_λ for each λ: the margin that λ is optimal for.

    Parameters
    ----------
    reward : array_like (N, K); safety : array_like (N, K) or (N, K, m); beta : float
    lam : float, array_like (m,), or array_like (L, m) / (L,) for a grid (L rows; with m = 1
        a 1-D array is read as L values of λ).

    Returns
    -------
    ndarray, shape (m,) for one λ, (L, m) for a grid.

    Raises
    ------
    InputError
        Bad scores or β (as `solve_dual`), or a λ that is negative, not finite or not numeric.
    """
    problem = DualProblem(reward, safety, beta, 0.0)
    try:
        lam = np.asarray(lam, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("must be numeric", field="lambda") from None
    single = lam.ndim == 0 or (lam.ndim == 1 and problem.m > 1)
    if lam.size % problem.m:
        raise InputError(f"must hold {problem.m} values per λ (one per constraint); got {lam.size}", field="lambda")
    grid = lam.reshape(-1, problem.m)
    if not np.all(np.isfinite(grid) & (grid >= 0)):
        raise InputError("every λ must be a finite number >= 0", field="lambda")
    out = np.array([problem.predict(lam).safety_gain for lam in grid])
    return out[0] if single else out


def lambda_for_margins(reward, safety, beta: float, margins, **solver_options) -> np.ndarray:
    """λ* for each margin vector.

    Parameters
    ----------
    margins : float, array_like (m,), or array_like (L, m) / (L,) for a sweep (with m = 1 a
        1-D array is read as L margins).

    Returns
    -------
    ndarray, shape (m,) for one margin vector, (L, m) for a sweep. Sweeps warm-start each
    solve from the previous λ*.

    Raises
    ------
    InputError
        Bad scores, β or margins (as `solve_dual`), or not m margins per row.
    InfeasibleMarginError, DualNotConvergedError
        For the first margin vector out of reach, or whose solve stops short.
    """
    R, G, beta, _ = validate_scores(reward, safety, beta, 0.0)
    m = G.shape[2]
    try:
        margins = np.asarray(margins, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("must be numeric", field="margins") from None
    if margins.size % m:
        raise InputError(f"must hold {m} values per row (one per constraint); got {margins.size}", field="margins")
    single = margins.ndim == 0 or (margins.ndim == 1 and m > 1)
    rows = margins.reshape(-1, m)
    out, lam0 = [], None
    for b in rows:
        res = solve_problem(DualProblem(R, G, beta, b), lam0=lam0, **solver_options)
        lam0 = res.lam
        out.append(res.lam)
    out = np.array(out)
    return out[0] if single else out
