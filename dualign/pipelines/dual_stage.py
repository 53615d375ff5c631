"""The dual stage shared by `dualign dual`, MoCAN and PeCAN: solve, bootstrap, summarize, plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.scores import ScoreArrays
from ..dual import (DualProblem, bootstrap_dual, min_unsafe_rate, unsafe_indicator, unsafe_rate,
                    unsafe_rate_constraints)
from ..errors import InputError
from ..eval.report import kl_prediction_text, sample_ceiling_note
from ..runio import array_digest, write_json


def solve_dual_stage(scores: ScoreArrays, beta: float, margins, *, n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0, progress: bool = True,
                     inputs: dict | None = None, signed: bool = True, max_unsafe_rate=None,
                     bootstrap_method: str = "auto") -> dict:
    """Solve the dual with bootstrap CIs and return the `dual.json` record (docs/design.md §2).

    `signed=False` marks safety scores whose sign means nothing (PeCAN's implicit ĝ =
    β log π_g/π_ref): the record then has no reference unsafe rate.

    `max_unsafe_rate` (one entry per constraint, None for a margin constraint) states
    constraints as "unsafe rate ≤ r": the dual runs on g = −1{score < 0} with the margin
    π_ref's rate − r (`dualign.dual.unsafe_rate`); `margins` entries of those constraints are
    ignored, and their record has kind "max_unsafe_rate", the bound, the smallest reachable
    rate, and reference_mean, gains, max_gain and slack in units of g (−unsafe rate); their
    bootstrap holds the bound r fixed. `bootstrap_method`: "auto", "one_step" or "full" (`bootstrap_dual`'s
    `method`; "one-step" also accepted). Every signed constraint's record gets the unsafe rate
    of π_λ* predicted from the same weights (`predicted_unsafe_rate`, also
    `predicted.unsafe_rate`), next to π_ref's (`unsafe_rate_reference`).

    Raises
    ------
    InputError
        A rate outside [0, 1], or rates with `signed=False`.
    InfeasibleMarginError, ValueError
        As `bootstrap_dual`; an unreachable rate (with the smallest reachable one).
    """
    m = scores.safety.shape[2]
    margins = np.broadcast_to(np.asarray(margins, dtype=float), (m,)).copy()
    rates = list(max_unsafe_rate) if max_unsafe_rate is not None else [None] * m
    if not signed and any(r is not None for r in rates):
        raise InputError("these safety scores have no meaningful sign (e.g. PeCAN's implicit β·log π_g/π_ref), "
                         "so no unsafe rate: state the constraint as a margin", field="max_unsafe_rate")
    G, margins, is_rate = unsafe_rate_constraints(scores.safety, margins, rates, scores.safety_names)
    bs = bootstrap_dual(scores.reward, G, beta, margins, n_boot=n_boot, level=level,
                        seed=seed, names=scores.safety_names, progress=progress, absolute=is_rate,
                        method=bootstrap_method)
    est = bs.estimate
    pred = est.predicted
    ci = bs.ci
    # π_λ*'s unsafe rates from the weights the predictions use (one more pass over the scores)
    pred_rates = unsafe_rate(scores.safety, DualProblem(scores.reward, G, beta, margins).weights(est.lam)) \
        if signed else None
    constraints = []
    for j, name in enumerate(scores.safety_names):
        constraints.append({
            "name": name, "kind": "max_unsafe_rate" if is_rate[j] else "margin",
            "margin": float(margins[j]), "lambda": float(est.lam[j]),
            "lambda_ci": ci["lambda"][j].tolist(), "active": bool(est.lam[j] > 0),
            "reference_mean": float(G[:, :, j].mean()),
            "predicted_gain": float(pred.safety_gain[j]), "predicted_gain_ci": ci["safety_gain"][j].tolist(),
            "max_gain": float(est.max_gain[j]), "slack": float(est.slack[j]),
        })
        if signed:
            constraints[-1]["unsafe_rate_reference"] = unsafe_rate(scores.safety[:, :, j])
            constraints[-1]["predicted_unsafe_rate"] = float(pred_rates[j])
        if is_rate[j]:
            constraints[-1].update(max_unsafe_rate=float(rates[j]), score="-1{" + name + " < 0}",
                                   min_unsafe_rate=min_unsafe_rate(scores.safety[:, :, j]))
    return {
        "beta": float(beta), "margins": margins.tolist(), "lambda": est.lam.tolist(),
        "feasible": True, "converged": bool(est.converged), "iterations": est.iterations,
        "kkt_residual": est.kkt_residual, "scaled_kkt_residual": est.scaled_kkt_residual,
        "n_prompts": int(scores.reward.shape[0]), "n_samples_per_prompt": int(scores.reward.shape[1]),
        "constraints": constraints,
        "predicted": {
            "reward_reference_mean": float(scores.reward.mean()),
            "reward_gain": pred.reward_gain, "reward_gain_ci": ci["reward_gain"][0].tolist(),
            "kl": pred.kl, "kl_ci": ci["kl"][0].tolist(),
            "ess_mean": pred.ess_mean, "ess_min": pred.ess_min, "ess_fraction": pred.ess_fraction,
            **({"unsafe_rate": {c["name"]: c["predicted_unsafe_rate"] for c in constraints}} if signed else {}),
        },
        "bootstrap": bs.to_dict(),
        "solver": est.options | {"n_evals": est.n_evals},
        "history": [h.tolist() for h in est.history],
        "inputs": {"scores_digest": array_digest(scores.reward, scores.safety), **(inputs or {})},
    }


def format_dual_summary(d: dict) -> str:
    """A readable multi-line summary of a `dual.json` record."""
    pct = int(round(d["bootstrap"]["level"] * 100))
    lines = [f"Dual solution   β = {d['beta']:g}   N = {d['n_prompts']} prompts × K = "
             f"{d['n_samples_per_prompt']} samples",
             f"  {'constraint':<22}{'margin':>9}{'λ*':>10}   {pct}% CI{'':<12}{'pred. gain':>11}"
             f"{'max gain':>10}"]
    for c in d["constraints"]:
        lo, hi = c["lambda_ci"]
        lines.append(f"  {c['name']:<22}{c['margin']:>9.4g}{c['lambda']:>10.4g}   [{lo:.4g}, {hi:.4g}]"
                     f"{'':<{max(1, 16 - len(f'[{lo:.4g}, {hi:.4g}]'))}}{c['predicted_gain']:>11.4g}"
                     f"{c['max_gain']:>10.4g}" + ("" if c["active"] else "   (inactive)"))
    lines += _unsafe_rate_lines(d)
    p = d["predicted"]
    lo, hi = p["reward_gain_ci"]
    lines.append(f"  predicted reward gain {p['reward_gain']:+.4g}  [{lo:+.4g}, {hi:+.4g}]   "
                 f"KL(π_λ‖π_ref) {kl_prediction_text(d)}")
    lines.append(f"  effective samples per prompt: mean {p['ess_mean']:.3g} of {d['n_samples_per_prompt']}"
                 f" (min {p['ess_min']:.3g})" + ("   ← few: predictions rest on few samples; draw more"
                                                   if p["ess_fraction"] < 0.1 else ""))
    ceiling = sample_ceiling_note(d)
    if ceiling:
        lines.append(f"  note: {ceiling}")
    lines.append(f"  certificate: converged={d['converged']} in {d['iterations']} Newton steps, "
                 f"KKT residual {d['kkt_residual']:.2e} (scaled {d['scaled_kkt_residual']:.2e}); "
                 f"{d['bootstrap']['n_boot']} bootstrap replicates"
                 + (f" (one-step, {d['bootstrap'].get('n_resolved', 0)} re-solved)"
                    if d["bootstrap"].get("method") == "one_step" else "")
                 + (f", {d['bootstrap']['n_infeasible']} infeasible" if d["bootstrap"]["n_infeasible"] else ""))
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def _unsafe_rate_lines(d: dict) -> list[str]:
    """The unsafe-rate block of the summary: π_ref's and π_λ*'s predicted rate of every signed
    constraint, the bound of rate constraints, and why an unsafe-rate bound is (in)active."""
    rows = [c for c in d["constraints"] if "predicted_unsafe_rate" in c]
    if not rows:
        return []
    lines = [f"  {'unsafe rate (score < 0)':<31}{'π_ref':>8}{'π_λ* (pred.)':>14}{'bound':>9}"]
    for c in rows:
        bound = f"≤ {_pct(c['max_unsafe_rate'])}" if c.get("kind") == "max_unsafe_rate" else ""
        lines.append(f"  {c['name']:<31}{_pct(c['unsafe_rate_reference']):>8}"
                     f"{_pct(c['predicted_unsafe_rate']):>14}{bound:>9}")
    for c in rows:
        if c.get("kind") != "max_unsafe_rate":
            continue
        ref, r = c["unsafe_rate_reference"], c["max_unsafe_rate"]
        if ref == 0:
            why = f"every sample is safe: π_ref and every π_λ meet ≤ {_pct(r)}; inactive (λ* = 0)"
        elif not c["active"]:
            why = (f"π_ref's {_pct(ref)} meets ≤ {_pct(r)}, and so does π_λ*: inactive (λ* = 0)" if ref <= r else
                   f"π_ref's {_pct(ref)} exceeds {_pct(r)}, but tilting toward reward already meets it: "
                   "inactive (λ* = 0)")
        elif ref <= r:
            why = (f"π_ref's {_pct(ref)} meets ≤ {_pct(r)}, but tilting toward reward alone would not: "
                   "the bound binds")
        else:
            why = f"binds: π_λ* is predicted at the bound (smallest reachable {_pct(c['min_unsafe_rate'])})"
        lines.append(f"  note: {c['name']}: {why}")
    return lines


def _dual_scores(scores: ScoreArrays, d: dict) -> np.ndarray:
    """The (N, K, m) scores the dual of record `d` ran on: a rate constraint's column as
    `unsafe_indicator` of it, the others as they are."""
    G = scores.safety.copy()
    for j, c in enumerate(d["constraints"]):
        if c.get("kind") == "max_unsafe_rate":
            G[:, :, j] = unsafe_indicator(G[:, :, j])
    return G


def held_out_prediction(d: dict, scores: ScoreArrays, *, n_boot: int = 1000, level: float = 0.95,
                        seed: int = 0) -> dict:
    """What π_λ* is predicted to do on other prompts: the tilt of dual record `d` (its λ*
    and β, fixed) applied to π_ref's samples of those prompts (`scores`, the held-out
    prompts' reference samples, scored).

    Why: the dual's own predictions are expectations over its prompts. A trained model is
    measured on held-out prompts, whose reference may be more or less unsafe than the dual's
    (on the demo, π_ref's mean harm is −0.68 on the dual's prompts and −0.36 on the held-out
    ones, so a gain of +0.59 there cannot be reached here). Predicting on the same prompts
    as the measurement removes that mismatch; no trained model is involved.

    Returns a dict: n_prompts, n_samples_per_prompt, reward_gain and reward_gain_ci,
    safety_gain (constraint name → gain on its dual score: −1{unsafe} for a rate constraint),
    safety_gain_ci (name → CI), kl (over the K samples, so at most log K), kl_ceiling (log K),
    ess_mean. CIs are percentile bootstraps over the prompts (λ* fixed).

    Raises
    ------
    ValueError
        `scores` has other safety columns than the record's constraints.
    """
    names = [c["name"] for c in d["constraints"]]
    if list(scores.safety_names) != names:
        raise ValueError(f"held-out scores have safety columns {list(scores.safety_names)}, the dual {names}")
    lam = np.asarray(d["lambda"], dtype=np.float64)
    G = _dual_scores(scores, d)
    n, k = scores.reward.shape

    def predict(rows):
        return DualProblem(scores.reward[rows], G[rows], d["beta"]).predict(lam)

    p = predict(np.arange(n))
    rng = np.random.default_rng(seed)
    boots = [predict(rng.integers(0, n, size=n)) for _ in range(n_boot)]
    br = np.array([b.reward_gain for b in boots])
    bg = np.array([b.safety_gain for b in boots]).reshape(n_boot, len(names))
    q = [(1 - level) / 2, (1 + level) / 2]
    return {"n_prompts": int(n), "n_samples_per_prompt": int(k), "reward_gain": float(p.reward_gain),
            "reward_gain_ci": [float(v) for v in np.quantile(br, q)],
            "safety_gain": {nm: float(v) for nm, v in zip(names, p.safety_gain)},
            "safety_gain_ci": {nm: [float(v) for v in np.quantile(bg[:, j], q)] for j, nm in enumerate(names)},
            "kl": p.kl, "kl_ceiling": float(np.log(k)), "ess_mean": p.ess_mean}


def write_dual_outputs(d: dict, scores: ScoreArrays, out_json=None, plot_dir=None) -> list[Path]:
    """Write dual.json (atomically) and, with `plot_dir`, the three figures. Returns the paths.

    The safety histogram marks the unsafe side (< 0) only when the record has unsafe rates."""
    from ..eval.figures import plot_convergence, plot_dual_curves, plot_safety_histogram

    written = []
    if out_json is not None:
        write_json(d, out_json)
        written.append(Path(out_json))
    if plot_dir is not None:
        plot_dir = Path(plot_dir)
        lam = np.array(d["lambda"])
        mg = np.array([c["max_gain"] for c in d["constraints"]])
        margins = np.array(d["margins"])
        sweep = [margins * f for f in (0.5, 1.0)] + [np.minimum(margins * 1.5, 0.95 * mg)]
        if not np.any(margins):
            sweep = [mg * f for f in (0.0, 0.25, 0.5)]
        written += [
            plot_safety_histogram(scores.safety, scores.safety_names, plot_dir / "safety_histogram.png",
                                  signed=all("unsafe_rate_reference" in c for c in d["constraints"])),
            plot_dual_curves(scores.reward, _dual_scores(scores, d), d["beta"], sweep, lam, scores.safety_names,
                             plot_dir / "dual_function.png"),
            plot_convergence(d["history"], lam, plot_dir / "solver_convergence.png"),
        ]
    return written
