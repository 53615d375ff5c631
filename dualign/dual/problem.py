"""The dual function of safety-constrained alignment, estimated from reference samples.

For multipliers λ >= 0 (shape (m,)) and scores of K reference samples for N prompts,

    z[x, k]  = (R[x, k] + G[x, k] @ λ) / β
    D(λ)     = β · mean_x log mean_k exp(z[x, k])  −  λ @ (ḡ + b)
    ∇D(λ)    = mean_x Σ_k w[x, k] G[x, k]  −  ḡ  −  b        w = softmax_k z[x, :]
    ∇²D(λ)   = (1/β) · mean_x Cov_w[G[x, :]]

with ḡ the reference policy's mean safety and b the margins (docs/design.md §2). Everything is
computed with log-sum-exp, so scores of any magnitude work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError


@dataclass
class Prediction:
    """What the tilted policy π_λ is predicted to do, relative to the reference.

    Attributes
    ----------
    reward : float
        E_x E_{π_λ}[r].
    reward_gain : float
        E_x E_{π_λ}[r] − E_x E_{π_ref}[r].
    safety_gain : numpy.ndarray, shape (m,)
        E_x E_{π_λ}[g_j] − E_x E_{π_ref}[g_j] per constraint.
    kl : float
        E_x KL(π_λ(.|x) ‖ π_ref(.|x)), in nats, over the K samples.
    ess_mean, ess_min, ess_median : float
        Effective sample size (Σw)²/Σw² per prompt, summarized over prompts (1 ≤ ESS ≤ K).
        A small ESS means the prediction rests on a few samples per prompt.
    ess_fraction : float
        ess_mean / K.
    """

    reward: float
    reward_gain: float
    safety_gain: np.ndarray
    kl: float
    ess_mean: float
    ess_min: float
    ess_median: float
    ess_fraction: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["safety_gain"] = [float(v) for v in self.safety_gain]
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in d.items()}


def _as_float_array(name: str, a) -> np.ndarray:
    """`a` as a float64 array; InputError (field `name`) when it is not numeric or not finite."""
    try:
        a = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise InputError("must be numeric", field=name) from None
    # A finite sum proves every entry finite (NaN and ±inf propagate), at the cost of one
    # reduction instead of a boolean array; only on failure is the culprit located.
    if not np.isfinite(a.sum()) and not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise InputError(f"non-finite value at index {tuple(int(i) for i in bad)}", field=name)
    return a


def validate_scores(reward, safety, beta, margins):
    """Check and normalize the inputs of the dual.

    Returns
    -------
    R : ndarray (N, K); G : ndarray (N, K, m); beta : float; b : ndarray (m,)

    Raises
    ------
    InputError
        (a ValueError) naming the field: non-numeric or non-finite scores, wrong or mismatched
        shapes, N < 1, K < 2, m < 1, β not a finite number > 0, or margins not finite or not one
        per constraint.
    """
    R = _as_float_array("reward", reward)
    G = _as_float_array("safety", safety)
    if R.ndim != 2:
        raise InputError(f"must have shape (N prompts, K samples); got shape {R.shape}", field="reward")
    if G.ndim == 2:
        G = G[:, :, None]
    if G.ndim != 3 or G.shape[:2] != R.shape:
        raise InputError(f"must have shape (N, K) or (N, K, m) matching reward {R.shape}; got {np.shape(safety)}",
                         field="safety")
    n, k, m = G.shape
    if n < 1:
        raise InputError("need at least one prompt", field="reward")
    if k < 2:
        raise InputError(f"need K >= 2 reference samples per prompt to estimate the dual; got K = {k}",
                         field="reward")
    if m < 1:
        raise InputError("no constraint (m = 0)", field="safety")
    try:
        beta = float(beta)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"must be a finite number > 0; got {beta!r}", field="beta") from None
    if not (np.isfinite(beta) and beta > 0):
        raise InputError(f"must be a finite number > 0; got {beta}", field="beta")
    b = np.broadcast_to(_as_float_array("margins", margins), (m,)).astype(np.float64) \
        if np.ndim(margins) == 0 else _as_float_array("margins", margins)
    if b.shape != (m,):
        raise InputError(f"must be a float or {m} floats (one per constraint); got shape {b.shape}",
                         field="margins")
    return np.ascontiguousarray(R), np.ascontiguousarray(G), beta, b


class DualProblem:
    """The sample estimate of the CAN dual D(λ) (docs/design.md §2).

    Parameters
    ----------
    reward : array_like, shape (N, K)
        Reward of K samples from the reference policy for each of N prompts.
    safety : array_like, shape (N, K) or (N, K, m)
        Safety scores (higher = safer) of the same samples, one column per constraint.
    beta : float
        KL coefficient, > 0.
    margins : float or array_like, shape (m,)
        Required gain of each mean safety score over the reference's.

    Raises
    ------
    ValueError
        See `validate_scores`.

    Notes
    -----
    One evaluation makes one pass over the scores and allocates a few (N, K) arrays, never
    an (N, K, m) one, so memory stays O(N·K) whatever m is.
    """

    def __init__(self, reward, safety, beta: float = 0.1, margins=0.0):
        self.R, self.G, self.beta, self.margins = validate_scores(reward, safety, beta, margins)
        self.n, self.k, self.m = self.G.shape
        self.g_ref = self.G.mean(axis=(0, 1))
        self.r_ref = float(self.R.mean())
        self._Rb = self.R / self.beta
        self._Gflat = self.G.reshape(self.n * self.k, self.m)  # a view: G is C-contiguous
        self._G2 = None
        self._cache = None  # (λ, log-mean-exp per prompt, weights) of the last pass
        self.n_evals = 0  # passes over the scores, for benchmarks

    # -- one pass over the scores ------------------------------------------------------
    def _tilt(self, lam):
        """One pass at λ: (λ (m,), log mean_k exp(z) (N,), e (N, K), s (N,), E_w[g] (N, m)).

        e = exp(z − max_k z) are the *unnormalized* weights and s their row sums, so
        w = e / s[:, None]; normalizing lazily saves a full pass over (N, K). The last
        pass is cached: the solver's final evaluation and `predict` share it.
        """
        lam = np.asarray(lam, dtype=np.float64).reshape(self.m)
        if self._cache is not None and np.array_equal(self._cache[0], lam):
            return self._cache
        self.n_evals += 1
        if not lam.any():
            z = self._Rb.copy()
        elif self.m == 1:  # an elementwise multiply beats a (NK, 1) matrix-vector product
            z = self._Gflat.reshape(self.n, self.k) * (lam[0] / self.beta)
            z += self._Rb
        else:
            # einsum, not BLAS: level-1/2 BLAS calls are slow under some OpenBLAS core settings
            z = np.einsum("nkm,m->nk", self.G, lam / self.beta)
            z += self._Rb
        zmax = z.max(axis=1, keepdims=True)
        z -= zmax
        # exp(-600) ≈ 1e-261 is already nothing next to the row's largest weight, 1; clipping
        # keeps every weight a normal float, since subnormal arithmetic is ~100x slower.
        np.maximum(z, -600.0, out=z)
        e = np.exp(z, out=z)
        s = e.sum(axis=1)
        lme = np.log(s / self.k) + zmax[:, 0]
        if self.m == 1:
            eg = np.einsum("nk,nk->n", e, self._Gflat.reshape(self.n, self.k))[:, None]
        else:
            eg = np.einsum("nk,nkm->nm", e, self.G)
        eg /= s[:, None]
        self._cache = (lam.copy(), lme, e, s, eg)
        return self._cache

    def evaluate(self, lam, hessian: bool = True):
        """D(λ), ∇D(λ) and (optionally) ∇²D(λ) from a single pass: (value, grad (m,), hess (m, m))."""
        lam, lme, e, s, eg = self._tilt(lam)
        target = self.g_ref + self.margins
        value = self.beta * lme.mean() - lam @ target
        grad = eg.mean(axis=0) - target
        hess = None
        if hessian:
            # mean_x Cov_w[g] = mean_x E_w[g gᵀ] − mean_x E_w[g] E_w[g]ᵀ; the prompt weights
            # 1/s are folded into e so E_w[g gᵀ] is one weighted Gram product.
            if self.m == 1:
                if self._G2 is None:  # g² once, so each Hessian costs one more pass, not three
                    self._G2 = self._Gflat.reshape(self.n, self.k) ** 2
                second = np.array([[np.einsum("nk,nk->n", e, self._G2) @ (1.0 / s)]])
            else:
                u = (e / s[:, None]).ravel()
                second = (self._Gflat * u[:, None]).T @ self._Gflat  # m (N, K) arrays, once
            hess = (second / self.n - eg.T @ eg / self.n) / self.beta
            hess = 0.5 * (hess + hess.T)
        return float(value), grad, hess

    def value(self, lam) -> float:
        """D(λ) (float). λ has shape (m,) (a float when m = 1)."""
        lam, lme = self._tilt(lam)[:2]
        return float(self.beta * lme.mean() - lam @ (self.g_ref + self.margins))

    def grad(self, lam) -> np.ndarray:
        """∇D(λ), shape (m,): the predicted constraint slack E_{π_λ}[g] − ḡ − b."""
        return self.evaluate(lam, hessian=False)[1]

    def hessian(self, lam) -> np.ndarray:
        """∇²D(λ), shape (m, m), symmetric positive semi-definite."""
        return self.evaluate(lam)[2]

    def predict(self, lam) -> Prediction:
        """Predicted reward, safety gain, KL and effective sample size of π_λ."""
        lam, lme, e, s, eg = self._tilt(lam)
        er_x = np.einsum("nk,nk->n", e, self.R) / s
        er = float(er_x.mean())
        egm = eg.mean(axis=0)
        # KL(π_λ ‖ π_ref) per prompt = E_w[z] − log mean_k exp(z), with E_w[z] = (E_w[r] + λ·E_w[g]) / β
        kl = float(np.mean((er_x + eg @ lam) / self.beta - lme))
        ess = s ** 2 / np.einsum("nk,nk->n", e, e)
        return Prediction(reward=er, reward_gain=er - self.r_ref, safety_gain=egm - self.g_ref,
                          kl=max(kl, 0.0), ess_mean=float(ess.mean()), ess_min=float(ess.min()),
                          ess_median=float(np.median(ess)), ess_fraction=float(ess.mean() / self.k))

    def weights(self, lam) -> np.ndarray:
        """π_λ's weights on each prompt's K samples, shape (N, K), rows summing to 1:
        w[x, k] = softmax_k (R[x, k] + G[x, k] @ λ) / β. Shares the cached pass of `predict`."""
        _, _, e, s, _ = self._tilt(lam)
        return e / s[:, None]

    def max_gain(self) -> np.ndarray:
        """Largest achievable gain per constraint on this sample, shape (m,).

        E_x max_k G[x, k, j] − ḡ_j: what putting all weight on each prompt's safest sample
        gives. A margin at or beyond it makes the dual unbounded below.
        """
        return self.G.max(axis=1).mean(axis=0) - self.g_ref

    def recession_slope(self, direction) -> float:
        """lim_{t→∞} D(λ + t·d)/t = mean_x max_k d·G[x, k] − d·(ḡ + b), for d >= 0.

        Negative for some d >= 0 exactly when the dual is unbounded below, i.e. the margins
        cannot be met jointly: a certificate of infeasibility.
        """
        d = np.asarray(direction, dtype=np.float64).reshape(self.m)
        return float((self.G @ d).max(axis=1).mean() - d @ (self.g_ref + self.margins))

    def max_joint_slack(self, constraints=None) -> float:
        """How far inside reach the margins are jointly, decided exactly by a linear program.

            t* = max_p min_j (mean_x Σ_k p[x, k] G[x, k, j] − ḡ_j − b_j) / s_j

        over per-prompt distributions p (N, K) on the samples (p >= 0, rows summing to 1), with
        s_j = max_gain_j (1 where it is 0): the slack every constraint can keep at once, in
        units of its largest achievable gain. t* > 0: some reweighting meets every margin with
        room to spare, and so (mixing in a little of π_ref) does one with full support, so
        Slater's condition holds and λ* is finite. t* < 0: no reweighting meets them all
        (the dual is unbounded below). t* = 0: only weights that drop samples reach them; π_λ
        gives every sample weight, so only λ → ∞ approaches them: out of reach.

        Parameters
        ----------
        constraints : array_like of bool, shape (m,), optional
            The constraints that take part (default: all).

        Returns
        -------
        float
            t*, accurate to the LP solver's tolerance (HiGHS' 1e-7); +inf with no constraint.

        Notes
        -----
        Solved by HiGHS' interior point method (`scipy.optimize.linprog`) over N·K + 1
        variables: about 0.1 s for 200 prompts × 24 samples × 8 constraints, 2 s for 10⁴ × 16 × 4,
        10 s for 5·10⁴ × 16 × 2 (one core), against milliseconds for a Newton solve; so
        `solve_problem` runs it only when Newton stops short.
        """
        import scipy.sparse as sp
        from scipy.optimize import linprog

        use = np.ones(self.m, dtype=bool) if constraints is None else np.asarray(constraints, dtype=bool)
        J = np.flatnonzero(use)
        if len(J) == 0:
            return float("inf")
        n, k, nk = self.n, self.k, self.n * self.k
        mg = self.max_gain()[J]
        s = np.where(mg > 0, mg, 1.0)
        # centred and scaled per constraint: the LP's coefficients are O(1) whatever the units
        A = (self._Gflat[:, J] - (self.g_ref[J] + self.margins[J])) / s  # (NK, |J|)
        # variables (p (NK), t); maximize t s.t. mean_x Σ_k p A_j >= t, Σ_k p[x, :] = 1
        A_ub = sp.hstack([sp.csr_matrix(-A.T / n), sp.csr_matrix(np.ones((len(J), 1)))], format="csr")
        rows = np.repeat(np.arange(n), k)
        A_eq = sp.hstack([sp.csr_matrix((np.ones(nk), (rows, np.arange(nk))), shape=(n, nk)),
                          sp.csr_matrix((n, 1))], format="csr")
        c = np.zeros(nk + 1)
        c[-1] = -1.0
        bounds = np.column_stack([np.r_[np.zeros(nk), -np.inf], np.full(nk + 1, np.inf)])
        res = linprog(c, A_ub=A_ub, b_ub=np.zeros(len(J)), A_eq=A_eq, b_eq=np.ones(n), bounds=bounds,
                      method="highs-ipm")
        if res.status != 0:  # never seen: the LP is feasible (t free) and bounded (p is)
            raise ArithmeticError(f"the feasibility LP failed: {res.message}")
        return float(-res.fun)
