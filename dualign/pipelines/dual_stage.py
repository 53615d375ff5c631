"""The dual stage shared by `dualign dual`, MoCAN and PeCAN: solve, bootstrap, summarize, plot.

Its result is one documented type, `DualRecord` (dual.json), the way SciPy's `OptimizeResult`
is one: the stages, the evaluation and the reports read its attributes, and it serializes
itself (`to_json`, `from_json`, `read`) with dual.json's keys.

Over 500 lines: the record types and their field documentation (about 330 lines) sit next to
the stage that makes them, so that what dual.json holds is read in one place.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.scores import ScoreArrays
from ..dual import (MAX_TRUSTED_SHIFT, DualProblem, bootstrap_dual, min_unsafe_rate, sample_bias, unsafe_indicator,
                    unsafe_rate, unsafe_rate_constraints)
from ..errors import InputError
from ..eval.report import kl_prediction_text, sample_ceiling_note
from ..runio import array_digest, write_json

RATE = "max_unsafe_rate"  # the `kind` of a constraint stated as a maximum unsafe rate
_MISSING = "missing: not a dual.json this version of dualign wrote; rerun the dual stage (--from dual)"


def _key(f: dataclasses.Field) -> str:
    """A field's key in dual.json (`lam` is stored as "lambda", a Python keyword)."""
    return f.metadata.get("key", f.name)


def _plain(v):
    """`v` as plain JSON values: records by their `to_json`, tuples as lists, mappings copied."""
    if hasattr(v, "to_json"):
        return v.to_json()
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class _JsonRecord:
    """`to_json` and key checking shared by the frozen records of dual.json. The dataclass's
    fields are in dual.json's key order; an optional field (default None) is left out of the
    JSON when None, as the dual stage leaves it out."""

    def to_json(self) -> dict:
        """The record as dual.json holds it: the same keys, in the same order, plain JSON values."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.default is None:
                continue
            out[_key(f)] = _plain(v)
        return out

    @classmethod
    def _values(cls, d, file, where: str) -> dict:
        """Field name → the JSON value of `d` for every field `d` has.

        Raises
        ------
        InputError
            `d` is not a JSON object, or lacks a required key (named as `where` + key, with `file`).
        """
        if not isinstance(d, dict):
            raise InputError(f"expected a JSON object, got {type(d).__name__}", file=file,
                             field=where.rstrip(".") or None)
        out = {}
        for f in dataclasses.fields(cls):
            if _key(f) in d:
                out[f.name] = _checked(f, d[_key(f)], file, where + _key(f))
            elif f.default is dataclasses.MISSING:
                raise InputError(_MISSING, file=file, field=where + _key(f))
        return out


# JSON types of the scalar fields, by their annotation (a float may be written as an integer)
_SCALARS = {"float": ((int, float), "a number"), "int": ((int,), "an integer"), "bool": ((bool,), "true or false"),
            "str": ((str,), "a string")}


def _checked(f: dataclasses.Field, v, file, where: str):
    """`v`, the JSON value of scalar field `f`; InputError when it has another JSON type."""
    kind = str(f.type).removesuffix(" | None")
    if kind not in _SCALARS or (v is None and f.default is None):
        return v
    types, what = _SCALARS[kind]
    if not isinstance(v, types) or (isinstance(v, bool) and kind != "bool"):
        raise InputError(f"expected {what}, got {json.dumps(v)[:40]}", file=file, field=where)
    return v


def _list_of(v, file, where: str) -> list:
    """`v`, which must be a JSON list; InputError naming `where` otherwise."""
    if not isinstance(v, list):
        raise InputError(f"expected a JSON list, got {type(v).__name__}", file=file, field=where)
    return v


@dataclass(frozen=True)
class ConstraintRecord(_JsonRecord):
    """One constraint of a `DualRecord` (an entry of dual.json's `constraints`).

    Margins, means and gains are in units of the constraint's dual score g: the safety score
    itself for kind "margin"; −1{score < 0} for kind "max_unsafe_rate" (a gain there is a fall
    of the unsafe rate). Unsafe rates are fractions in [0, 1]: the mean over prompts of each
    prompt's fraction of samples with score < 0 (`dualign.dual.unsafe_rate`).

    Attributes
    ----------
    name : str
        The safety column, e.g. "safety/harm".
    kind : str
        "margin" (E_π[g] ≥ E_ref[g] + margin) or "max_unsafe_rate" (unsafe rate ≤
        `max_unsafe_rate`, solved as a margin on g = −1{unsafe}).
    margin : float
        b, the gain over π_ref asked for, units of g (a rate constraint's: π_ref's rate − the bound).
    lam : float
        λ* ≥ 0 of this constraint (JSON key "lambda"), reward units per unit of g.
    lambda_ci : tuple of float, (lo, hi)
        λ*'s percentile bootstrap CI over prompts (level `DualRecord.bootstrap["level"]`).
    active : bool
        λ* > 0: the constraint binds.
    reference_mean : float
        E_ref[g], the mean of g over π_ref's samples.
    predicted_gain : float
        E_{π_λ*}[g] − E_ref[g], predicted by reweighting π_ref's samples.
    predicted_gain_ci : tuple of float, (lo, hi)
        Its bootstrap CI.
    max_gain : float
        The largest gain any reweighting of the samples reaches (each prompt's best sample).
    slack : float
        ∇D(λ*) for this constraint: predicted gain − margin (≈ 0 when active, ≥ 0 when not).
    unsafe_rate_reference, predicted_unsafe_rate : float or None
        π_ref's unsafe rate and π_λ*'s, predicted from the same weights; None (absent from the
        JSON) for safety scores without a meaningful sign (PeCAN's implicit ĝ).
    max_unsafe_rate : float or None
        The bound r of a "max_unsafe_rate" constraint; None (absent) for a margin constraint.
    score : str or None
        What λ* multiplies for a rate constraint, "-1{<name> < 0}"; None (absent) otherwise.
    min_unsafe_rate : float or None
        A rate constraint's smallest reachable unsafe rate (each prompt's safest sample),
        approached only as λ → ∞; None (absent) otherwise.
    """

    name: str
    kind: str
    margin: float
    lam: float = field(metadata={"key": "lambda"})
    lambda_ci: tuple
    active: bool
    reference_mean: float
    predicted_gain: float
    predicted_gain_ci: tuple
    max_gain: float
    slack: float
    unsafe_rate_reference: float | None = None
    predicted_unsafe_rate: float | None = None
    max_unsafe_rate: float | None = None
    score: str | None = None
    min_unsafe_rate: float | None = None

    @property
    def is_rate(self) -> bool:
        """Whether the constraint is stated as a maximum unsafe rate (λ* weighs −1{unsafe})."""
        return self.kind == RATE

    @classmethod
    def from_json(cls, d: dict, file=None, where: str = "") -> ConstraintRecord:
        """The constraint of dual.json entry `d`; InputError (naming `file` and the field) when a
        required key is missing."""
        v = cls._values(d, file, where)
        for k in ("lambda_ci", "predicted_gain_ci"):
            v[k] = tuple(_list_of(v[k], file, where + k))
        return cls(**v)


@dataclass(frozen=True)
class PredictedRecord(_JsonRecord):
    """What π_λ* is predicted to do on the dual's prompts (dual.json's `predicted`): the tilt
    of π_ref's K samples per prompt, averaged over prompts. CIs are percentile bootstraps over
    prompts at `DualRecord.bootstrap["level"]`.

    Attributes
    ----------
    reward_reference_mean : float
        E_ref[r], reward units.
    reward_gain : float
        E_{π_λ*}[r] − E_ref[r], reward units.
    reward_gain_ci : tuple of float, (lo, hi)
    kl : float
        KL(π_λ*‖π_ref) in nats over the K samples: at most log K (`eval.report.at_sample_ceiling`).
    kl_ci : tuple of float, (lo, hi)
    ess_mean, ess_min : float
        Effective sample size (Σw)²/Σw² per prompt (1 to K samples), mean and min over prompts.
    ess_fraction : float
        ess_mean / K.
    unsafe_rate : dict str -> float, or None
        Constraint name → π_λ*'s predicted unsafe rate (as `ConstraintRecord.predicted_unsafe_rate`);
        None (absent from the JSON) for safety scores without a meaningful sign.
    bias_corrected : dict or None
        The same predictions with their 1/K sample bias removed (`bias_corrected_of`): keys
        reward_gain, safety_gain (constraint name → gain), kl, k. None (absent) in records
        written before dualign computed it.
    """

    reward_reference_mean: float
    reward_gain: float
    reward_gain_ci: tuple
    kl: float
    kl_ci: tuple
    ess_mean: float
    ess_min: float
    ess_fraction: float
    unsafe_rate: dict | None = None
    bias_corrected: dict | None = None

    @classmethod
    def from_json(cls, d: dict, file=None, where: str = "predicted.") -> PredictedRecord:
        """The prediction of dual.json's `predicted` object `d` (InputError as `DualRecord.from_json`)."""
        v = cls._values(d, file, where)
        if v.get("unsafe_rate") is not None:
            if not isinstance(v["unsafe_rate"], dict):
                raise InputError("expected a JSON object", file=file, field=where + "unsafe_rate")
            v["unsafe_rate"] = dict(v["unsafe_rate"])
        for k in ("reward_gain_ci", "kl_ci"):
            v[k] = tuple(_list_of(v[k], file, where + k))
        return cls(**v)


@dataclass(frozen=True)
class DualRecord(_JsonRecord):
    """The dual stage's result, as dual.json holds it (docs/design.md §2): λ*, its certificate,
    what π_λ* is predicted to do, and the bootstrap CIs.

    `solve_dual_stage` makes it, `DualRecord.read` loads it; every stage, the evaluation and
    the reports read its attributes. `to_json()` gives dual.json's object with today's keys in
    today's order (`lam` as "lambda"), and `from_json(to_json())` gives the record back. m is
    the number of constraints, N the prompts, K the samples per prompt.

    Attributes
    ----------
    beta : float
        β, the KL weight of the objective (reward units per nat).
    margins : tuple of float, shape (m,)
        The margins b the dual was solved with (units of each constraint's g).
    lam : tuple of float, shape (m,)
        λ* (JSON key "lambda"), one per constraint, ≥ 0.
    feasible : bool
        True: a record is written only for a feasible dual (an unreachable margin raises).
    converged : bool
        Whether the solver reached its tolerance (a solve that stops short raises instead).
    iterations : int
        Newton steps taken.
    kkt_residual : float
        ‖min(λ, ∇D(λ*))‖∞, units of g.
    scaled_kkt_residual : float
        The same with each slack divided by its constraint's largest achievable gain (unitless).
    n_prompts, n_samples_per_prompt : int
        N and K of the scores the dual ran on.
    constraints : tuple of ConstraintRecord, length m
        Per constraint: λ*, its CI, margin, predicted gain, unsafe rates.
    predicted : PredictedRecord
        Reward gain, KL and effective sample size of π_λ* (with CIs).
    bootstrap : dict
        `dualign.dual.bootstrap_dual`'s summary, as its `to_dict` writes it: level, n_boot,
        n_infeasible, seed, ci (name → per-row [lo, hi] lists), method and, when they apply,
        n_resolved and n_not_converged.
    solver : dict
        The solver's options (method, tol, max_iter, ...) and n_evals, passes over the scores.
    history : tuple of tuple of float, shape (iterations + 1, m)
        λ after every Newton step, from the starting point.
    inputs : dict
        Provenance: scores_digest (of the reward and safety arrays) and what the caller added
        (e.g. the scores file and its digest).

    Notes
    -----
    `from_json` keeps `bootstrap`, `solver` and `inputs` as the JSON has them (their keys
    vary with the bootstrap method and the caller) and ignores keys it does not know.
    """

    beta: float
    margins: tuple
    lam: tuple = field(metadata={"key": "lambda"})
    feasible: bool
    converged: bool
    iterations: int
    kkt_residual: float
    scaled_kkt_residual: float
    n_prompts: int
    n_samples_per_prompt: int
    constraints: tuple
    predicted: PredictedRecord
    bootstrap: dict
    solver: dict
    history: tuple
    inputs: dict

    @property
    def names(self) -> list[str]:
        """The constraints' safety columns, in order."""
        return [c.name for c in self.constraints]

    def constraint(self, name: str) -> ConstraintRecord | None:
        """The constraint on safety column `name`, or None."""
        return next((c for c in self.constraints if c.name == name), None)

    def predicted_gains(self) -> dict:
        """Score name → π_λ*'s predicted gain on the dual's prompts ("reward", then each
        constraint's column)."""
        return {"reward": self.predicted.reward_gain, **{c.name: c.predicted_gain for c in self.constraints}}

    @classmethod
    def from_json(cls, d: dict, file=None) -> DualRecord:
        """The record of dual.json's object `d`; `file` (the path it was read from) names it in errors.

        Raises
        ------
        InputError
            A required key is missing (naming `file` and the field, e.g. "constraints[0].lambda_ci"),
            a part has the wrong JSON type, or the lengths of margins, lambda and constraints differ.
        """
        v = cls._values(d, file, "")
        cons = _list_of(v["constraints"], file, "constraints")
        v["constraints"] = tuple(ConstraintRecord.from_json(c, file, f"constraints[{j}].")
                                 for j, c in enumerate(cons))
        v["predicted"] = PredictedRecord.from_json(v["predicted"], file)
        for k in ("margins", "lambda"):
            name = "lam" if k == "lambda" else k
            v[name] = tuple(_list_of(v[name], file, k))
            if len(v[name]) != len(cons):
                raise InputError(f"{len(v[name])} entries for {len(cons)} constraints", file=file, field=k)
        v["history"] = tuple(tuple(_list_of(h, file, "history")) for h in _list_of(v["history"], file, "history"))
        for k in ("bootstrap", "solver", "inputs"):
            if not isinstance(v[k], dict):
                raise InputError(f"expected a JSON object, got {type(v[k]).__name__}", file=file, field=k)
            v[k] = copy.deepcopy(v[k])
        return cls(**v)

    @classmethod
    def read(cls, path) -> DualRecord:
        """The record in the dual.json at `path`.

        Raises
        ------
        InputError
            The file is missing or not JSON, or as `from_json` (naming the file).
        """
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InputError("not found: run the dual stage first", file=str(path)) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read a dual record: {e}", file=str(path)) from None
        return cls.from_json(d, str(path))


@dataclass(frozen=True)
class HeldOutPrediction(_JsonRecord):
    """What π_λ* is predicted to do on other prompts (`held_out_prediction`): the tilt of a
    `DualRecord` (λ*, β fixed) applied to π_ref's samples of those prompts. CIs are percentile
    bootstraps over those prompts (λ* fixed).

    Attributes
    ----------
    n_prompts, n_samples_per_prompt : int
        The held-out prompts and π_ref's samples of each.
    reward_gain : float
        Predicted reward gain over π_ref on them, reward units.
    reward_gain_ci : tuple of float, (lo, hi)
    safety_gain : dict str -> float
        Constraint name → predicted gain on its dual score (−1{unsafe} for a rate constraint).
    safety_gain_ci : dict str -> tuple of float
        Constraint name → its CI (lo, hi).
    kl : float
        KL(π_λ*‖π_ref) over the K samples, nats (at most log K).
    kl_ceiling : float
        log K.
    ess_mean : float
        Mean effective sample size per prompt (1 to K).
    bias_corrected : dict or None
        As `PredictedRecord.bias_corrected`, on these samples.
    """

    n_prompts: int
    n_samples_per_prompt: int
    reward_gain: float
    reward_gain_ci: tuple
    safety_gain: dict
    safety_gain_ci: dict
    kl: float
    kl_ceiling: float
    ess_mean: float
    bias_corrected: dict | None = None


def solve_dual_stage(scores: ScoreArrays, beta: float, margins, *, n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0, progress: bool = True,
                     inputs: dict | None = None, sign_means_unsafe: bool = True, max_unsafe_rate=None,
                     bootstrap_method: str = "auto") -> DualRecord:
    """Solve the dual with bootstrap CIs and return its `DualRecord` (dual.json; docs/design.md §2).

    `sign_means_unsafe=False` marks safety scores whose sign means nothing (PeCAN's implicit ĝ =
    β log π_g/π_ref): the record then has no reference unsafe rate.

    `max_unsafe_rate` (one entry per constraint, None for a margin constraint) states
    constraints as "unsafe rate ≤ r": the dual runs on g = −1{score < 0} with the margin
    π_ref's rate − r (`dualign.dual.unsafe_rate`); `margins` entries of those constraints are
    ignored, and their record has kind "max_unsafe_rate", the bound, the smallest reachable
    rate, and reference_mean, gains, max_gain and slack in units of g (−unsafe rate); their
    bootstrap holds the bound r fixed. `bootstrap_method`: "auto", "one_step" or "full" (`bootstrap_dual`'s
    `method`; "one-step" also accepted). Every constraint whose score's sign means unsafe gets the unsafe rate
    of π_λ* predicted from the same weights (`predicted_unsafe_rate`, also
    `predicted.unsafe_rate`), next to π_ref's (`unsafe_rate_reference`).

    Raises
    ------
    InputError
        A rate outside [0, 1], or rates with `sign_means_unsafe=False`.
    InfeasibleMarginError, ValueError
        As `bootstrap_dual`; an unreachable rate (with the smallest reachable one).
    """
    m = scores.safety.shape[2]
    margins = np.broadcast_to(np.asarray(margins, dtype=float), (m,)).copy()
    rates = list(max_unsafe_rate) if max_unsafe_rate is not None else [None] * m
    if not sign_means_unsafe and any(r is not None for r in rates):
        raise InputError("these safety scores have no meaningful sign (e.g. PeCAN's implicit β·log π_g/π_ref), "
                         "so no unsafe rate: state the constraint as a margin", field="max_unsafe_rate")
    G, margins, is_rate = unsafe_rate_constraints(scores.safety, margins, rates, scores.safety_names)
    bs = bootstrap_dual(scores.reward, G, beta, margins, n_boot=n_boot, level=level,
                        seed=seed, names=scores.safety_names, progress=progress, absolute=is_rate,
                        method=bootstrap_method)
    est = bs.estimate
    pred = est.predicted
    ci = bs.ci
    # one problem for the unsafe rates (from the weights the predictions use) and the bias correction
    problem = DualProblem(scores.reward, G, beta, margins)
    pred_rates = unsafe_rate(scores.safety, problem.weights(est.lam)) if sign_means_unsafe else None
    constraints = []
    for j, name in enumerate(scores.safety_names):
        constraints.append(ConstraintRecord(
            name=name, kind=RATE if is_rate[j] else "margin",
            margin=float(margins[j]), lam=float(est.lam[j]),
            lambda_ci=tuple(ci["lambda"][j].tolist()), active=bool(est.lam[j] > 0),
            reference_mean=float(G[:, :, j].mean()),
            predicted_gain=float(pred.safety_gain[j]), predicted_gain_ci=tuple(ci["safety_gain"][j].tolist()),
            max_gain=float(est.max_gain[j]), slack=float(est.slack[j]),
            **({"unsafe_rate_reference": unsafe_rate(scores.safety[:, :, j]),
                "predicted_unsafe_rate": float(pred_rates[j])} if sign_means_unsafe else {}),
            **({"max_unsafe_rate": float(rates[j]), "score": "-1{" + name + " < 0}",
                "min_unsafe_rate": min_unsafe_rate(scores.safety[:, :, j])} if is_rate[j] else {}),
        ))
    return DualRecord(
        beta=float(beta), margins=tuple(margins.tolist()), lam=tuple(est.lam.tolist()),
        feasible=True, converged=bool(est.converged), iterations=est.iterations,
        kkt_residual=est.kkt_residual, scaled_kkt_residual=est.scaled_kkt_residual,
        n_prompts=int(scores.reward.shape[0]), n_samples_per_prompt=int(scores.reward.shape[1]),
        constraints=tuple(constraints),
        predicted=PredictedRecord(
            reward_reference_mean=float(scores.reward.mean()),
            reward_gain=pred.reward_gain, reward_gain_ci=tuple(ci["reward_gain"][0].tolist()),
            kl=pred.kl, kl_ci=tuple(ci["kl"][0].tolist()),
            ess_mean=pred.ess_mean, ess_min=pred.ess_min, ess_fraction=pred.ess_fraction,
            unsafe_rate={c.name: c.predicted_unsafe_rate for c in constraints} if sign_means_unsafe else None,
            bias_corrected=bias_corrected_of(problem, est.lam, scores.safety_names),
        ),
        bootstrap=bs.to_dict(),
        solver=est.options | {"n_evals": est.n_evals},
        history=tuple(tuple(h.tolist()) for h in est.history),
        inputs={"scores_digest": array_digest(scores.reward, scores.safety), **(inputs or {})},
    )


def format_dual_summary(d: DualRecord) -> str:
    """A readable multi-line summary of a dual record."""
    boot = d.bootstrap
    pct = int(round(boot["level"] * 100))
    lines = [f"Dual solution   β = {d.beta:g}   N = {d.n_prompts} prompts × K = "
             f"{d.n_samples_per_prompt} samples",
             f"  {'constraint':<22}{'margin':>9}{'λ*':>10}   {pct}% CI{'':<12}{'pred. gain':>11}"
             f"{'max gain':>10}"]
    for c in d.constraints:
        lo, hi = c.lambda_ci
        lines.append(f"  {c.name:<22}{c.margin:>9.4g}{c.lam:>10.4g}   [{lo:.4g}, {hi:.4g}]"
                     f"{'':<{max(1, 16 - len(f'[{lo:.4g}, {hi:.4g}]'))}}{c.predicted_gain:>11.4g}"
                     f"{c.max_gain:>10.4g}" + ("" if c.active else "   (inactive)"))
    lines += _unsafe_rate_lines(d)
    p = d.predicted
    lo, hi = p.reward_gain_ci
    lines.append(f"  predicted reward gain {p.reward_gain:+.4g}  [{lo:+.4g}, {hi:+.4g}]   "
                 f"KL(π_λ‖π_ref) {kl_prediction_text(d)}")
    lines.append(f"  effective samples per prompt: mean {p.ess_mean:.3g} of {d.n_samples_per_prompt}"
                 f" (min {p.ess_min:.3g})" + ("   ← few: predictions rest on few samples; draw more"
                                              if p.ess_fraction < 0.1 else ""))
    if p.bias_corrected:
        lines.append("  " + bias_corrected_line(p.bias_corrected))
    ceiling = sample_ceiling_note(d)
    if ceiling:
        lines.append(f"  note: {ceiling}")
    lines.append(f"  certificate: converged={d.converged} in {d.iterations} Newton steps, "
                 f"KKT residual {d.kkt_residual:.2e} (scaled {d.scaled_kkt_residual:.2e}); "
                 f"{boot['n_boot']} bootstrap replicates"
                 + (f" (one-step, {boot.get('n_resolved', 0)} re-solved)" if boot.get("method") == "one_step" else "")
                 + (f", {boot['n_infeasible']} infeasible" if boot["n_infeasible"] else ""))
    return "\n".join(lines)


def bias_corrected_line(b: dict) -> str:
    """The `bias_corrected` predictions of a record as one summary line."""
    gains = ", ".join(f"{nm} {v:+.4g}" for nm, v in b["safety_gain"].items())
    line = (f"without the bias of K = {b['k']} samples (jackknife): reward gain {b['reward_gain']:+.4g}, {gains}, "
            f"KL {b['kl']:.3g} nats (the largest moved {b['relative_shift']:.0%})")
    if b["relative_shift"] > MAX_TRUSTED_SHIFT:  # beyond the 1/K regime the jackknife's expansion assumes
        line += "; a correction this large is not to be trusted either: draw more samples or raise β"
    return line


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def _unsafe_rate_lines(d: DualRecord) -> list[str]:
    """The unsafe-rate block of the summary: π_ref's and π_λ*'s predicted rate of every
    constraint, the bound of rate constraints, and why an unsafe-rate bound is (in)active."""
    rows = [c for c in d.constraints if c.predicted_unsafe_rate is not None]
    if not rows:
        return []
    lines = [f"  {'unsafe rate (score < 0)':<31}{'π_ref':>8}{'π_λ* (pred.)':>14}{'bound':>9}"]
    for c in rows:
        bound = f"≤ {_pct(c.max_unsafe_rate)}" if c.is_rate else ""
        lines.append(f"  {c.name:<31}{_pct(c.unsafe_rate_reference):>8}"
                     f"{_pct(c.predicted_unsafe_rate):>14}{bound:>9}")
    for c in rows:
        if not c.is_rate:
            continue
        ref, r = c.unsafe_rate_reference, c.max_unsafe_rate
        if ref == 0:
            why = f"every sample is safe: π_ref and every π_λ meet ≤ {_pct(r)}; inactive (λ* = 0)"
        elif not c.active:
            why = (f"π_ref's {_pct(ref)} meets ≤ {_pct(r)}, and so does π_λ*: inactive (λ* = 0)" if ref <= r else
                   f"π_ref's {_pct(ref)} exceeds {_pct(r)}, but tilting toward reward already meets it: "
                   "inactive (λ* = 0)")
        elif ref <= r:
            why = (f"π_ref's {_pct(ref)} meets ≤ {_pct(r)}, but tilting toward reward alone would not: "
                   "the bound binds")
        else:
            why = f"binds: π_λ* is predicted at the bound (smallest reachable {_pct(c.min_unsafe_rate)})"
        lines.append(f"  note: {c.name}: {why}")
    return lines


def _dual_scores(scores: ScoreArrays, d: DualRecord) -> np.ndarray:
    """The (N, K, m) scores the dual of record `d` ran on: a rate constraint's column as
    `unsafe_indicator` of it, the others as they are."""
    G = scores.safety.copy()
    for j, c in enumerate(d.constraints):
        if c.is_rate:
            G[:, :, j] = unsafe_indicator(G[:, :, j])
    return G


def held_out_prediction(d: DualRecord, scores: ScoreArrays, *, n_boot: int = 1000, level: float = 0.95,
                        seed: int = 0) -> HeldOutPrediction:
    """What π_λ* is predicted to do on other prompts: the tilt of dual record `d` (its λ*
    and β, fixed) applied to π_ref's samples of those prompts (`scores`, the held-out
    prompts' reference samples, scored).

    Why: the dual's own predictions are expectations over its prompts. A trained model is
    measured on held-out prompts, whose reference may be more or less unsafe than the dual's
    (on the demo, π_ref's mean harm is −0.68 on the dual's prompts and −0.36 on the held-out
    ones, so a gain of +0.59 there cannot be reached here). Predicting on the same prompts
    as the measurement removes that mismatch; no trained model is involved.

    Returns a `HeldOutPrediction`: n_prompts, n_samples_per_prompt, reward_gain and its CI,
    safety_gain (constraint name → gain on its dual score: −1{unsafe} for a rate constraint)
    and its CIs, kl (over the K samples, so at most log K), kl_ceiling (log K), ess_mean. CIs
    are percentile bootstraps over the prompts (λ* fixed).

    Raises
    ------
    ValueError
        `scores` has other safety columns than the record's constraints.
    """
    names = d.names
    if list(scores.safety_names) != names:
        raise ValueError(f"held-out scores have safety columns {list(scores.safety_names)}, the dual {names}")
    lam = np.asarray(d.lam, dtype=np.float64)
    G = _dual_scores(scores, d)
    n, k = scores.reward.shape

    def predict(rows):
        return DualProblem(scores.reward[rows], G[rows], d.beta).predict(lam)

    p = predict(np.arange(n))
    rng = np.random.default_rng(seed)
    boots = [predict(rng.integers(0, n, size=n)) for _ in range(n_boot)]
    br = np.array([b.reward_gain for b in boots])
    bg = np.array([b.safety_gain for b in boots]).reshape(n_boot, len(names))
    q = [(1 - level) / 2, (1 + level) / 2]
    return HeldOutPrediction(
        n_prompts=int(n), n_samples_per_prompt=int(k), reward_gain=float(p.reward_gain),
        reward_gain_ci=tuple(float(v) for v in np.quantile(br, q)),
        safety_gain={nm: float(v) for nm, v in zip(names, p.safety_gain)},
        safety_gain_ci={nm: tuple(float(v) for v in np.quantile(bg[:, j], q)) for j, nm in enumerate(names)},
        kl=p.kl, kl_ceiling=float(np.log(k)), ess_mean=p.ess_mean,
        bias_corrected=bias_corrected_of(DualProblem(scores.reward, G, d.beta), lam, names))


def bias_corrected_of(problem: DualProblem, lam, names) -> dict:
    """π_λ's predicted gains and KL with their 1/K sample bias removed (`dualign.dual.sample_bias`,
    a jackknife over each prompt's samples), as dual.json stores them: reward_gain,
    safety_gain (name → gain), kl, k, and relative_shift (how far the correction moved the
    largest of them, relative). (`DualProblem` itself refuses fewer than 2 samples per prompt.)"""
    b = sample_bias(problem, lam)
    return {"reward_gain": b.reward_gain_corrected,
            "safety_gain": {nm: float(v) for nm, v in zip(names, b.safety_gain_corrected)},
            "kl": b.kl_corrected, "k": b.k, "relative_shift": b.relative_shift()}


def write_dual_outputs(d: DualRecord, scores: ScoreArrays, out_json=None, plot_dir=None) -> list[Path]:
    """Write dual.json (`d.to_json()`, atomically) and, with `plot_dir`, the three figures. Returns the paths.

    The safety histogram marks the unsafe side (< 0) only when the record has unsafe rates."""
    from ..eval.figures import plot_convergence, plot_dual_curves, plot_safety_histogram

    written = []
    if out_json is not None:
        write_json(d.to_json(), out_json)
        written.append(Path(out_json))
    if plot_dir is not None:
        plot_dir = Path(plot_dir)
        lam = np.array(d.lam)
        mg = np.array([c.max_gain for c in d.constraints])
        margins = np.array(d.margins)
        sweep = [margins * f for f in (0.5, 1.0)] + [np.minimum(margins * 1.5, 0.95 * mg)]
        if not np.any(margins):
            sweep = [mg * f for f in (0.0, 0.25, 0.5)]
        written += [
            plot_safety_histogram(scores.safety, scores.safety_names, plot_dir / "safety_histogram.png",
                                  sign_means_unsafe=all(c.unsafe_rate_reference is not None for c in d.constraints)),
            plot_dual_curves(scores.reward, _dual_scores(scores, d), d.beta, sweep, lam, scores.safety_names,
                             plot_dir / "dual_function.png"),
            plot_convergence([list(h) for h in d.history], lam, plot_dir / "solver_convergence.png"),
        ]
    return written


def learned_tilt_on(d: DualRecord, scores: ScoreArrays, logratio, *, seed: int = 0):
    """`eval.tilt.learned_tilt` of a trained model against the tilt of dual record `d`, on the
    scored reference samples `scores` (the held-out prompts', as in `held_out_prediction`):
    `logratio` (N, K) is log π_θ/π_ref of those samples, the target r_λ/β with `d`'s λ* and β
    (a rate constraint's score as −1{unsafe}, as the dual saw it).

    Raises
    ------
    ValueError
        `scores` has other safety columns than the record's constraints, or shapes disagree.
    """
    from ..eval.tilt import learned_tilt

    if list(scores.safety_names) != d.names:
        raise ValueError(f"scores have safety columns {list(scores.safety_names)}, the dual {d.names}")
    G = _dual_scores(scores, d)
    target = (scores.reward + G @ np.asarray(d.lam, dtype=np.float64)) / d.beta
    return learned_tilt(logratio, target, scores.reward, G, d.names, seed=seed)
