"""Bootstrap confidence intervals for λ* and for every prediction, by resampling prompts.

Two methods draw the same resamples for the same seed (replicate b resamples the N prompts
with replacement; its prompt weights are their multiplicities / N):

``"full"``
    Re-solve the dual on every resample: exact, and a few passes over all N·K scores per
    replicate (about 0.4 s per replicate at 30k prompts × 128 samples).

``"auto"`` (default)
    ``"full"`` while N·K·B ≤ `AUTO_FULL_BUDGET` score-replicates (seconds), else ``"one_step"``.

``"one_step"``
    Expand around λ*. The dual is an average over prompts, D(λ) = mean_x d_x(λ) − λ·(ḡ + b),
    so a replicate's derivatives at λ* are weighted sums of per-prompt terms,

        ∇D_b   = Σ_x w_bx E[g | x] − (ḡ_b + b),     ∇²D_b = Σ_x w_bx Cov[g | x] / β,
        ∇³D_b  = Σ_x w_bx κ3[g | x] / β²            (moments under π_λ*'s weights on x's samples)

    tabulated once (one pass over the scores) and combined for all replicates by one matrix
    product of the (B, N) prompt weights with the (N, ·) table. Each replicate then takes one
    Newton step from λ*, the minimizer over λ ≥ 0 of its quadratic model of D (the solver's
    projection): λ*'s active set where that satisfies the model's KKT conditions (an active
    λ_j stays ≥ 0, an inactive constraint's model slack stays ≥ 0), in one batched solve;
    otherwise the model's nonnegative QP is solved exactly, so a constraint near the edge
    (λ*_j ≈ 0, or near 0 in some replicates) switches on or off per replicate as in a
    re-solve. The step gets a second-order correction from ∇³D on the face it lands on
    (the Newton iteration's next term without a second pass). Every prediction is a weighted
    mean over prompts of a per-prompt f_x(λ) (E[r], E[g], KL, ESS), evaluated with the
    replicate's prompt weights to second order in λ_b − λ* (its derivatives are within-prompt
    co-moments, e.g. ∂E[r]/∂λ = Cov[r, g]/β); an active constraint's gain is its margin, as
    at any optimum.

    λ_b − λ* is O(N^-1/2) and the error of the expansion O(N^-3/2), against intervals of width
    O(N^-1/2). A replicate falls back to a full re-solve when the expansion is not trusted:
    the correction is over ONE_STEP_MAX_CORRECTION of the step (both measured in the Hessian's
    metric), or the step's Newton decrement ν_b = sqrt(δᵀ∇²D_b δ / β) (δ = λ_b − λ*: the RMS
    change of the tilt's log-weights within a prompt) is over ONE_STEP_MAX_DECREMENT, or the
    correction would push an active λ_j to 0 or below, or a constraint's score is constant
    within all of the replicate's prompts but not within all prompts (its Hessian row
    vanishes). A replicate whose margin is out of reach alone (the solver's own test,
    `_check_margins`) is counted infeasible without solving, as the re-solve would count it.

    Measured against "full" (same resamples; tests/test_bootstrap.py): interval endpoints
    within 0.3% of the interval's width at 300-1,000 prompts with a margin at half the
    largest gain, within 2.5% at 40-100 prompts, and for unsafe-rate bounds. Near the edge
    (a margin at 90% of the largest gain, or an unsafe rate near the smallest reachable one)
    the dual is strongly curved and at 40-1,000 prompts 40-80% of the replicates are re-solved
    (the cost moves toward "full"); at 30k prompts × 128 samples none is in those cases (the
    correction stays under 0.1 of the step), and the 1,000 replicates take about 0.4 s against
    about 400 s re-solved.

One module, though over 500 lines: the two methods draw the same resamples, report the same
fields, and the one-step method falls back to the full re-solve replicate by replicate, so they
share `_Replicates` and the solve; most of the length is the one-step expansion described above.
"""
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

METHODS = ("auto", "one_step", "full")
# "auto" re-solves every replicate ("full") while that costs at most this many
# score-replicates (N·K·B: about 10-20 s here), and takes one step ("one_step") beyond it: the
# expansion is exact to O(N^-3/2), which at a few hundred prompts is not yet small next to
# the interval (the demo's 106 prompts: λ's median replicate 3.76 one-step against 2.81
# re-solved), while at 30k prompts × 128 samples the full bootstrap takes minutes.
AUTO_FULL_BUDGET = 2e8
# A replicate whose second-order correction exceeds this fraction of its step is re-solved:
# the expansion's remaining error grows like (correction / step)² · step and is then at most
# about 1% of the step. Measured: at 1,000 prompts only margins near the edge of reach
# cross it (a margin at 90% of the largest gain: half the replicates); at 30k prompts no
# replicate does (largest 0.09 in that edge case).
ONE_STEP_MAX_CORRECTION = 0.1
# ... or whose tilt's log-weights move by over half a nat (RMS): out of the expansion's reach.
ONE_STEP_MAX_DECREMENT = 0.5
# Prompt weights are built for this many replicates at a time: a (chunk, N) float64 matrix of
# about 64 MB (the one large temporary of the one-step method).
_CHUNK_BYTES = 64 << 20


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
    method : str
        "one_step" or "full" (see the module docstring).
    n_resolved : int
        With "one_step": replicates that fell back to a full re-solve.
    """

    estimate: DualResult
    ci: dict
    replicates: dict
    level: float
    n_boot: int
    n_infeasible: int
    seed: int
    n_not_converged: int = 0
    method: str = "full"
    n_resolved: int = 0

    def to_dict(self) -> dict:
        d = {"level": self.level, "n_boot": self.n_boot, "n_infeasible": self.n_infeasible,
             "seed": self.seed, "ci": {k: v.tolist() for k, v in self.ci.items()}, "method": self.method}
        if self.method == "one_step":
            d["n_resolved"] = self.n_resolved
        if self.n_not_converged:  # absent when 0, so records of clean runs are as before
            d["n_not_converged"] = self.n_not_converged
        return d


def check_method(method) -> str:
    """`method` as one of METHODS ("one-step" is accepted for "one_step").

    Raises
    ------
    InputError
        Anything else (field `method`).
    """
    m = method.replace("-", "_") if isinstance(method, str) else method
    if m not in METHODS:
        raise InputError(f"must be one of auto, one_step, full; got {method!r}", field="method")
    return m


def bootstrap_dual(reward, safety, beta: float = 0.1, margins=0.0, *, n_boot: int = 1000,
                   level: float = 0.95, seed: int = 0, names=None, progress: bool = False,
                   absolute=None, method: str = "auto", **solver_options) -> BootstrapResult:
    """Solve the dual, then bootstrap it over `n_boot` resamples of the prompts.

    Parameters
    ----------
    reward, safety, beta, margins
        As in `solve_dual`.
    n_boot : int
        Bootstrap replicates (≥ 1).
    level : float
        Confidence level of the percentile intervals, in (0, 1).
    seed : int
        Seed of the resampling (≥ 0); the same seed gives the same intervals, and both
        methods the same resamples.
    progress : bool
        Show a progress bar.
    absolute : array_like of bool, shape (m,), optional
        Constraints whose bound is absolute, E_π[g] ≥ ḡ + b with ḡ the *full* sample's mean
        (a maximum unsafe rate: E_π[−1{unsafe}] ≥ −r), held fixed in every replicate; the
        others (default: all) keep their margin b over each replicate's own reference mean.
    method : {"auto", "one_step", "full"}
        "auto" (default): "full" while N·K·n_boot ≤ AUTO_FULL_BUDGET, else "one_step".
        "one_step": one Newton step per replicate from λ* with second-order
        corrections, all replicates at once, re-solving only those it cannot trust
        (hundreds of times cheaper at 30k prompts; intervals within a few per cent of their
        width of the full re-solve's); "full": re-solve every replicate. See the module
        docstring.
    **solver_options
        `tol`, `max_iter` of `solve_dual` (for the estimate and every full re-solve).

    Returns
    -------
    BootstrapResult

    Raises
    ------
    InputError
        (a ValueError) `n_boot` not an integer >= 1, `level` not in (0, 1), `seed` not an
        integer >= 0, `method` unknown, or bad scores (as `solve_dual`).
    InfeasibleMarginError, DualNotConvergedError
        As `solve_dual`, for the full sample (replicates that fail are counted, not raised).
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"must be an integer >= 1; got {n_boot!r}", field="n_boot")
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0 < level < 1:
        raise InputError(f"must be in (0, 1), e.g. 0.95; got {level!r}", field="level")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"must be an integer >= 0; got {seed!r}", field="seed")
    method = check_method(method)
    R, G, beta, b = validate_scores(reward, safety, beta, margins)
    absolute = np.zeros(G.shape[2], dtype=bool) if absolute is None else \
        np.broadcast_to(np.asarray(absolute, dtype=bool), (G.shape[2],))
    unit = score_unit(R, G, b)  # once: every replicate's scores are drawn from these
    problem = DualProblem(R, G, beta, b)
    estimate = solve_problem(problem, names=names, unit=unit, **solver_options)
    rng = np.random.default_rng(seed)
    n = R.shape[0]
    if method == "auto":
        method = "full" if R.size * n_boot <= AUTO_FULL_BUDGET else "one_step"
    # Drawn one replicate at a time, in this order, by both methods: the same seed gives
    # the same resamples (a single (B, N) draw would give other integers).
    draws = (rng.integers(0, n, size=n) for _ in range(n_boot))
    ctx = _Replicates(R, G, beta, b, absolute, problem.g_ref, names, unit, estimate.lam, solver_options)
    if method == "full":
        values, status = _full(ctx, draws, n_boot, progress)
        n_resolved = 0
    else:
        values, status, n_resolved = _one_step(ctx, problem, estimate, draws, n_boot, progress)
    ok = status == _OK
    alpha = (1 - level) / 2
    replicates, ci = {}, {}
    for k in _FIELDS:
        arr = values[k][ok]
        replicates[k] = arr
        ci[k] = (np.stack([np.quantile(arr, alpha, axis=0), np.quantile(arr, 1 - alpha, axis=0)], axis=1)
                 if len(arr) else np.full((arr.shape[1], 2), np.nan))
    return BootstrapResult(estimate=estimate, ci=ci, replicates=replicates, level=level,
                           n_boot=n_boot, n_infeasible=int(np.sum(status == _INFEASIBLE)), seed=seed,
                           n_not_converged=int(np.sum(status == _NOT_CONVERGED)), method=method,
                           n_resolved=n_resolved)


_OK, _INFEASIBLE, _NOT_CONVERGED = 0, 1, 2


@dataclass
class _Replicates:
    """What every replicate shares: the scores, the bounds, the solver's settings."""

    R: np.ndarray
    G: np.ndarray
    beta: float
    b: np.ndarray
    absolute: np.ndarray
    g_full: np.ndarray  # the full sample's mean safety, (m,): where absolute bounds sit
    names: object
    unit: float
    lam: np.ndarray
    solver_options: dict

    def solve(self, idx) -> tuple[int, dict | None]:
        """Re-solve the dual on prompts `idx`: (status, the _FIELDS values or None)."""
        G_rep = self.G[idx]
        # an absolute bound is the same number in every replicate: its margin over the
        # replicate's reference mean moves with that mean
        b_rep = np.where(self.absolute, self.b + self.g_full - G_rep.mean(axis=(0, 1)), self.b) \
            if self.absolute.any() else self.b
        try:
            res = solve_problem(DualProblem(self.R[idx], G_rep, self.beta, b_rep), names=self.names,
                                lam0=self.lam, unit=self.unit, **self.solver_options)
        except InfeasibleMarginError:
            return _INFEASIBLE, None
        except DualNotConvergedError:
            return _NOT_CONVERGED, None
        return _OK, {k: f(res) for k, f in _FIELDS.items()}


def _empty_values(n_boot: int, m: int) -> dict:
    return {k: np.full((n_boot, m if k in ("lambda", "safety_gain") else 1), np.nan) for k in _FIELDS}


def _full(ctx: _Replicates, draws, n_boot: int, progress: bool):
    """Every replicate re-solved: (values {field: (B, d)}, status (B,))."""
    values = _empty_values(n_boot, ctx.G.shape[2])
    status = np.full(n_boot, _OK)
    if progress:
        from tqdm.auto import tqdm
        draws = tqdm(draws, total=n_boot, desc="bootstrap", unit="rep")
    for i, idx in enumerate(draws):
        status[i], v = ctx.solve(idx)
        if v is not None:
            for k in _FIELDS:
                values[k][i] = v[k]
    return values, status


# -- the one-step method ---------------------------------------------------------------------

_BLOCK_ELEMENTS = 1 << 20  # prompts are tabulated in blocks of about this many samples


def _prompt_table(problem: DualProblem, lam) -> tuple[np.ndarray, dict]:
    """Per-prompt terms at λ, one row per prompt: each replicate's quantity is the product of
    its prompt weights (summing to 1) with this table. Returns (table (N, p), column slices).

    Columns (m constraints; w = π_λ's weights on a prompt's samples, E and Cov under w,
    dg = g − E[g], dr = r − E[r]):
      eg     E[g]          gbar  mean_k g       gmax  max_k g     rbar  mean_k r
      varies 1 where g is not constant over the prompt's samples
      cov    E[dg dgᵀ] / β             the prompt's term of ∇²D, and ∂E[g]/∂λ
      k3g    E[dg_l dg_i dg_j] / β²    (m³) of ∇³D, and ∂²E[g_l]/∂λ_i∂λ_j
      er     E[r]     der  E[dr dg] / β = ∂E[r]/∂λ     k3r  E[dr dg dgᵀ] / β² = ∂²E[r]/∂λ²
      kl     KL(π_λ ‖ π_ref) over the samples (its derivatives are sums of the above)
      ess    1 / Σ w², dess and d2ess its first and second derivatives in λ
    One pass over the scores, blockwise so temporaries stay small (the tilt at λ* is the
    solver's cached one).
    """
    lam, lme, e, s, eg = problem._tilt(lam)
    n, k, m = problem.G.shape
    beta, R, G = problem.beta, problem.R, problem.G
    cov, k3g = np.empty((n, m, m)), np.empty((n, m, m, m))
    der, k3r = np.empty((n, m)), np.empty((n, m, m))
    w2g, w2gg, s2 = np.empty((n, m)), np.empty((n, m, m)), np.empty(n)
    er = np.empty(n)
    step = max(1, _BLOCK_ELEMENTS // k)
    for a in range(0, n, step):
        blk = slice(a, min(n, a + step))
        w = e[blk] / s[blk, None]
        er[blk] = np.einsum("nk,nk->n", w, R[blk])
        dr = R[blk] - er[blk, None]
        dg = [G[blk, :, j] - eg[blk, j:j + 1] for j in range(m)]
        w2 = w * w
        s2[blk] = w2.sum(axis=1)
        wdr = w * dr
        for i in range(m):
            wdg = w * dg[i]
            w2g[blk, i] = np.einsum("nk,nk->n", w2, dg[i])
            der[blk, i] = np.einsum("nk,nk->n", wdr, dg[i])
            for j in range(i, m):
                wdgg = wdg * dg[j]
                cov[blk, i, j] = cov[blk, j, i] = wdgg.sum(axis=1)
                k3r[blk, i, j] = k3r[blk, j, i] = np.einsum("nk,nk->n", wdgg, dr)
                w2gg[blk, i, j] = w2gg[blk, j, i] = np.einsum("nk,nk->n", w2 * dg[i], dg[j])
                for h in range(j, m):
                    v = np.einsum("nk,nk->n", wdgg, dg[h])
                    for p in {(i, j, h), (i, h, j), (j, i, h), (j, h, i), (h, i, j), (h, j, i)}:
                        k3g[(blk, *p)] = v
    ess = 1.0 / s2
    # ESS = 1/S2 with S2 = Σ w²: ∂S2 = 2 Σ w² dg / β, ∂²S2 = (4 Σ w² dg dgᵀ − 2 S2 Cov[g]) / β²
    ds2 = 2.0 * w2g / beta
    d2s2 = (4.0 * w2gg - 2.0 * s2[:, None, None] * cov) / beta ** 2
    dess = -ds2 * ess[:, None] ** 2
    d2ess = 2.0 * ds2[:, :, None] * ds2[:, None, :] * ess[:, None, None] ** 3 - d2s2 * ess[:, None, None] ** 2
    cols = {"eg": eg, "gbar": G.mean(axis=1), "gmax": G.max(axis=1), "varies": (G.max(axis=1) != G.min(axis=1)),
            "cov": cov / beta, "k3g": k3g / beta ** 2, "er": er, "der": der / beta, "k3r": k3r / beta ** 2,
            "rbar": R.mean(axis=1), "kl": (er + eg @ lam) / beta - lme, "ess": ess, "dess": dess,
            "d2ess": d2ess}
    slices, start, parts = {}, 0, []
    for name, a in cols.items():
        a = np.asarray(a, dtype=np.float64).reshape(n, -1)
        slices[name] = slice(start, start + a.shape[1])
        start += a.shape[1]
        parts.append(a)
    return np.concatenate(parts, axis=1), slices


def _one_step(ctx: _Replicates, problem: DualProblem, estimate: DualResult, draws, n_boot: int,
              progress: bool):
    """One projected Newton step per replicate from λ* (see the module docstring):
    (values {field: (B, d)}, status (B,), replicates re-solved)."""
    c = ctx.unit
    # solver units: scores beyond 2^±32 are divided by c, as the estimate's solve did
    work = problem if c == 1.0 else DualProblem(ctx.R / c, ctx.G / c, ctx.beta / c, ctx.b / c)
    n, k, m = work.G.shape
    lam = estimate.lam
    table, col = _prompt_table(work, lam)
    beta, b, g_full = work.beta, work.margins, work.g_ref
    # constraints the solver pins at λ = 0: constant within every prompt (see _check_margins)
    fixed = table[:, col["varies"]].sum(axis=0) == 0
    values = _empty_values(n_boot, m)
    status = np.full(n_boot, _OK)
    chunk = int(max(1, min(n_boot, _CHUNK_BYTES // (8 * n))))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_boot, desc="bootstrap (one-step)", unit="rep")
    resolve = {}  # replicate → its draw, for those re-solved in full
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        W = np.empty((stop - start, n))
        draws_here = []
        for i in range(stop - start):
            draws_here.append(next(draws))
            W[i] = np.bincount(draws_here[-1], minlength=n)
        W /= n
        T = W @ table  # (B, p): every replicate's weighted sums at once
        del W
        t = {name: T[:, s] for name, s in col.items()}
        B = stop - start
        gbar = t["gbar"]
        # the margin each replicate's solve would see (absolute bounds move with its ḡ)
        b_rep = np.where(ctx.absolute, b + g_full - gbar, b)
        grad = t["eg"] - gbar - b_rep
        H = t["cov"].reshape(B, m, m)
        T3 = t["k3g"].reshape(B, m, m, m)
        # _check_margins per replicate: a margin at or beyond its largest gain is out of reach
        # (unless the score is constant on every prompt and the margin <= 0: flat, λ_j = 0)
        mg = t["gmax"] - gbar
        flat_rep = t["varies"] == 0
        out = b_rep >= mg - 1e-9 * np.abs(mg)
        infeasible = np.any(out & ~(flat_rep & (b_rep <= 0)), axis=1)
        lam_b, first, unsure = _step(H, T3, grad, lam, fixed)
        d = lam_b - lam
        nu = np.sqrt(np.maximum(np.einsum("bi,bij,bj->b", d, H, d), 0.0) / beta)
        dc = lam_b - first
        rho = np.sqrt(np.maximum(np.einsum("bi,bij,bj->b", dc, H, dc), 0.0) / beta) / np.maximum(nu, 1e-300)
        # a constraint that turns on or off in a replicate crosses the kink of the projection:
        # the quadratic model of D is extrapolated across it (on the demo's 106 prompts it put
        # 16 of 623 replicates at λ = 0 where the re-solve gives 0.8-1.1)
        switched = np.any(((lam > 0) != (lam_b > 0)) & ~fixed, axis=1)
        bad = (unsure | switched | np.any(flat_rep != fixed, axis=1) | ~(nu <= ONE_STEP_MAX_DECREMENT)
               | ~(rho <= ONE_STEP_MAX_CORRECTION)) & ~infeasible
        sl = slice(start, stop)
        status[sl][infeasible] = _INFEASIBLE
        for i in np.flatnonzero(bad):
            resolve[start + i] = draws_here[i]
        # predictions at λ_b with the replicate's prompt weights, to second order in d
        reward = t["er"][:, 0] + np.einsum("bj,bj->b", t["der"], d) + _half_quad(t["k3r"], d)[:, 0]
        safety = t["eg"] + np.einsum("bij,bj->bi", H, d) + _half_quad(t["k3g"], d)
        # an active constraint holds with equality at the replicate's optimum (slack 0, as the
        # step solves for), exactly as in a re-solve: its gain is its margin
        safety = np.where((lam + d > 0) & ~fixed, gbar + b_rep, safety)
        # KL: ∂kl = Cov[z, g]/β, ∂²kl = (Cov[g, g]/β + κ3[z, g, g]/β)/β with z = (r + λ·g)/β
        dkl = (t["der"] + H @ lam) / beta
        d2kl = (H + t["k3r"].reshape(B, m, m) + np.einsum("l,blij->bij", lam, T3)) / beta
        kl = t["kl"][:, 0] + np.einsum("bj,bj->b", dkl, d) + 0.5 * np.einsum("bij,bi,bj->b", d2kl, d, d)
        ess = t["ess"][:, 0] + np.einsum("bj,bj->b", t["dess"], d) + _half_quad(t["d2ess"], d)[:, 0]
        values["lambda"][sl] = lam + d
        values["reward"][sl, 0] = reward * c
        values["reward_gain"][sl, 0] = (reward - t["rbar"][:, 0]) * c
        values["safety_gain"][sl] = (safety - gbar) * c
        values["kl"][sl, 0] = np.maximum(kl, 0.0)
        values["ess_mean"][sl, 0] = np.clip(ess, 1.0, k)
        if bar is not None:
            bar.update(stop - start)
    for i, idx in resolve.items():  # the few replicates the expansion does not cover
        status[i], v = ctx.solve(idx)
        for key in _FIELDS:
            values[key][i] = v[key] if v is not None else np.nan
    if bar is not None:
        bar.close()
    return values, status, len(resolve)


def _half_quad(second, d) -> np.ndarray:
    """½ dᵀ A_l d for each replicate and each of L quantities, from their second derivatives
    `second` (B, L·m·m) and the steps d (B, m): shape (B, L)."""
    B, m = d.shape
    return 0.5 * np.einsum("blij,bi,bj->bl", second.reshape(B, -1, m, m), d, d)


def _step(H, T3, grad, lam, fixed):
    """Each replicate's Newton step from λ (m,) on its model of D, minimized over λ' >= 0
    with the `fixed` constraints at 0. H (B, m, m), T3 (B, m, m, m) (∇²D, ∇³D at λ),
    grad (B, m) (∇D at λ) → (λ' (B, m); λ' before the correction; (B,) bool: where the
    correction was refused or something is not finite, so the step is not to be trusted).

    1. The quadratic model q(λ') = grad·δ + ½ δᵀHδ (δ = λ' − λ). In one batched solve, the
       step that keeps λ's active set (free: λ_j > 0, not fixed); where that point breaks the
       model's KKT conditions (a free λ'_j < 0, or an inactive constraint whose model slack
       grad_j + (Hδ)_j < 0 wants in) the nonnegative QP is solved exactly (`_nonneg_qp`).
    2. A second-order correction on the face the step lands on (F: λ'_j > 0): the gradient
       there is grad + Hδ + ½ T3[δ, δ], so δ_F −= H_FF⁻¹ (½ T3[δ, δ])_F, which takes the
       error of the step from O(δ²) to O(δ³); refused (and the replicate flagged) where it
       would take some λ'_j in F to 0 or below."""
    B, m = grad.shape
    free = (lam > 0) & ~fixed
    out = np.broadcast_to(np.where(free, lam, 0.0), (B, m)).copy()
    if free.any():
        out[:, free] = lam[free] + _solve(H[:, free][:, :, free], -grad[:, free])
    d = out - lam
    slack = grad + np.einsum("bij,bj->bi", H, d)
    ok = np.all(out[:, free] >= 0, axis=1) & np.all((slack >= 0)[:, ~free & ~fixed], axis=1) \
        & np.all(np.isfinite(out), axis=1)
    for i in np.flatnonzero(~ok):
        out[i] = _nonneg_qp(H[i], grad[i], lam, fixed)
    first = out.copy()
    unsure = np.zeros(B, dtype=bool)
    d = out - lam
    corr = 0.5 * np.einsum("blij,bi,bj->bl", T3, d, d)
    face = (out > 0) & ~fixed
    for pattern in np.unique(face, axis=0):
        if not pattern.any():
            continue
        rows = np.flatnonzero(np.all(face == pattern, axis=1))
        fix = _solve(H[rows][:, pattern][:, :, pattern], corr[rows][:, pattern])
        new = out[np.ix_(rows, pattern)] - fix
        keep = np.all(new > 0, axis=1) & np.all(np.isfinite(new), axis=1)
        out[np.ix_(rows[keep], pattern)] = new[keep]
        unsure[rows[~keep]] = True
    return out, first, unsure | ~np.all(np.isfinite(out), axis=1)


def _solve(H, rhs) -> np.ndarray:
    """H⁻¹ rhs for a batch: H (B, f, f), rhs (B, f); regularized as the solver's Newton
    system (where the tilt collapsed onto one sample and H is nearly singular); NaN rows
    where it is singular all the same (those replicates are re-solved)."""
    f = H.shape[1]
    reg = 1e-12 * np.maximum(np.trace(H, axis1=1, axis2=2) / f, 1e-300)
    try:
        return np.linalg.solve(H + reg[:, None, None] * np.eye(f), rhs[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        x = np.full(rhs.shape, np.nan)
        for i in range(len(H)):
            try:
                x[i] = np.linalg.solve(H[i] + reg[i] * np.eye(f), rhs[i])
            except np.linalg.LinAlgError:
                pass
        return x


def _nonneg_qp(H, grad, lam, fixed) -> np.ndarray:
    """argmin over λ' >= 0 (λ'_fixed = 0) of grad·(λ' − λ) + ½ (λ' − λ)ᵀ H (λ' − λ), H (m, m).

    As a nonnegative least-squares problem: with H_UU = L Lᵀ on the unfixed constraints U and
    c = (grad − H λ)_U, ½ λ'ᵀ H_UU λ' + c·λ' = ½ ‖Lᵀ λ' + L⁻¹ c‖² + const. NaN when H_UU is
    not positive definite even regularized (the caller re-solves that replicate)."""
    from scipy.linalg import LinAlgError, cholesky, solve_triangular
    from scipy.optimize import nnls

    U = ~fixed
    out = np.zeros(len(lam))
    if not U.any():
        return out
    Hu = H[np.ix_(U, U)]
    Hu = Hu + 1e-12 * max(np.trace(Hu) / U.sum(), 1e-300) * np.eye(U.sum())
    c = (grad - H @ lam)[U]
    try:
        L = cholesky(Hu, lower=True)
        x, _ = nnls(L.T, -solve_triangular(L, c, lower=True))
    except (LinAlgError, ValueError, RuntimeError):
        return np.full(len(lam), np.nan)
    out[U] = x
    return out
