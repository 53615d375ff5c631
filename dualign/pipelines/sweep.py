"""`dualign sweep`: the paper's table. Several margins (or multipliers λ), one MoCAN training
each, the dual's prediction next to what every trained model achieves on held-out prompts.

    once, in <out>/:          sample π_ref → score
    per point, <out>/points/<name>/:
                              dual at the point's margin → pairs → train → evaluate → report
    at the end, in <out>/:    sweep.json, sweep.md (the table), figures/frontier.png

Every point is a complete MoCAN run directory (report, eval.json, model). Before a point runs it
gets copies of the shared stage outputs (π_ref's samples and scores, and, once the first point
has made them, the scored preference pairs and π_ref's evaluation samples), which its stages
find current: a point computes only what depends on its margin. Copies keep their timestamps
(`shutil.copy2`), and a point never writes into the shared folder. A killed sweep, rerun with
the same settings, finds its finished points current (each skips every stage) and goes on.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from ..dual import MAX_TRUSTED_SHIFT, trusted_correction
from ..errors import InputError
from ..eval.report import kl_at_sample_ceiling
from ..runio import run_lock, write_json, write_text
from .config import MoCANConfig, validated
from .dual_stage import DualRecord

KINDS = ("fraction", "margin", "lambda")
POINTS_DIR = "points"
# what a point reuses from the sweep folder; the reference's evaluation samples are made by the
# first point and shared from then on (glob patterns relative to a run directory)
SHARED = ("samples.parquet", "scores.parquet", "pairs_source/*", "eval/reference/*",
          "eval/behaviour/*/reference/*")
KL_TOLERANCE = 0.35  # the bar: achieved KL within ±35% of the predicted one


def point_name(kind: str, value: float) -> str:
    """Folder name of a point: `fraction-0.5`, `margin-1.25`, `lambda-2` (made from the number,
    never from user text)."""
    return f"{kind}-{float(value):g}"


def parse_points(text: str, kind: str) -> list[float]:
    """Comma-separated numbers → list of floats (`--margins 0.25,0.5,0.9`).

    Raises
    ------
    InputError
        A value that is not a number, a repeated value, no value, a fraction outside (0, 1),
        or a negative margin or λ.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    flag = {"fraction": "--margins", "margin": "--margins", "lambda": "--lambdas"}[kind]
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"must be comma-separated numbers, got {text!r}", field=flag) from None
    if not values:
        raise InputError("no values given", field=flag)
    if len(set(values)) != len(values):
        raise InputError(f"repeated value in {text!r}", field=flag)
    if kind == "fraction" and not all(0 < v < 1 for v in values):
        raise InputError("fractions of the largest achievable gain must lie in (0, 1) "
                         "(use --absolute for margins in score units)", field=flag)
    if not all(np.isfinite(v) and v >= 0 for v in values):
        raise InputError("values must be finite and >= 0", field=flag)
    return values


def point_configs(cfg: MoCANConfig, kind: str, values, arrays=None) -> list[tuple[str, MoCANConfig]]:
    """One MoCAN config per point, each in its own folder under `<cfg.out>/points/`.

    `fraction`: `margin_fraction` = the value (every constraint); `margin`: that margin for the
    single safety constraint; `lambda`: the margin that λ is optimal for on the shared samples
    (`margin_for_lambda` on `arrays`, the shared samples' `ScoreArrays`; one safety
    constraint), so the dual gives back λ.

    Raises
    ------
    InputError
        `margin` or `lambda` with several safety constraints, or a config with
        `max_unsafe_rate` or fixed `margins` (a sweep sets the margins itself).
    """
    check_sweep(cfg, kind)
    names = list(cfg.safety)
    root = Path(cfg.out) / POINTS_DIR
    out = []
    for v in values:
        if kind == "fraction":
            change = {"margin_fraction": float(v)}
        elif kind == "margin":
            change = {"margins": {names[0]: float(v)}}
        else:
            change = {"margins": {names[0]: _margin_for_lambda(arrays, cfg.beta, float(v))}}
        name = point_name(kind, v)
        out.append((name, dataclasses.replace(cfg, out=str(root / name), **change)))
    return out


def check_sweep(cfg: MoCANConfig, kind: str) -> None:
    """The settings errors of `point_configs`, raised before anything runs."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if cfg.max_unsafe_rate or cfg.margins:
        field = "max_unsafe_rate" if cfg.max_unsafe_rate else "margins"
        raise InputError("a sweep sets the margins itself: remove this setting from the config", field=field)
    if kind != "fraction" and len(cfg.safety) != 1:
        raise InputError(f"absolute margins and λ sweep one safety constraint; this config has {len(cfg.safety)} "
                         "(sweep fractions instead)", field="safety")


def _margin_for_lambda(arrays, beta: float, lam: float) -> float:
    from ..dual import margin_for_lambda

    # the dual solved at this margin gives back λ (to the solver's tolerance and the rounding)
    return float(np.round(margin_for_lambda(arrays.reward, arrays.safety, beta, lam)[0], 6))


def copy_shared(src: Path, dst: Path) -> list[Path]:
    """Copy the shared stage outputs (`SHARED`) that `src` has and `dst` lacks, keeping their
    timestamps; returns the files copied (paths under `dst`)."""
    copied = []
    for pattern in SHARED:
        for f in sorted(Path(src).glob(pattern)):
            target = Path(dst) / f.relative_to(src)
            if f.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".part")
                shutil.copy2(f, tmp)
                tmp.replace(target)  # atomic: a killed copy leaves no half file under the real name
                copied.append(target)
    return copied


def run_sweep(cfg: MoCANConfig, kind: str, values, log=print) -> Path:
    """Run the sweep; returns the sweep folder (`cfg.out`). See the module docstring.

    Parameters
    ----------
    cfg : MoCANConfig
        Everything but the margins; `out` is the sweep folder.
    kind : "fraction", "margin" or "lambda"
        What `values` are: fractions of the largest achievable gain, margins in score units,
        or multipliers λ.
    values : sequence of float
        One point each, in this order.

    Raises
    ------
    InputError
        As `point_configs`, and whatever a MoCAN run raises (before its first expensive step).
    """
    validated(cfg)
    check_sweep(cfg, kind)
    with run_lock(cfg.out):  # the shared stages run in this folder; each point locks its own
        return _run_sweep(cfg, kind, values, log)


def _run_sweep(cfg: MoCANConfig, kind: str, values, log) -> Path:
    from ..data.scores import read_score_arrays
    from .mocan import run_mocan

    root = Path(cfg.out)
    log(f"[sweep] shared stages in {root}/: π_ref's samples and their scores")
    run_mocan(cfg, stop="score", log=log)
    arrays = read_score_arrays(root / "scores.parquet")  # π_ref's scores: λ → margin, and the frontier
    points = point_configs(cfg, kind, values, arrays)
    for i, (name, pcfg) in enumerate(points, 1):
        log(f"\n[sweep {i}/{len(points)}] {name}")
        point = Path(pcfg.out)
        copy_shared(root, point)
        run_mocan(pcfg, log=log)
        copy_shared(point, root)  # the pairs' scores and π_ref's evaluation, for the next points
    summary = summarize(root, [(name, Path(p.out)) for name, p in points], kind)
    write_json(summary, root / "sweep.json")
    write_text(format_sweep_table(summary), root / "sweep.md")
    plot_frontier(summary, arrays, cfg.beta, root / "figures" / "frontier.png")
    log("\n" + format_sweep_table(summary))
    return root


def _within(pred: float, lo: float, hi: float) -> bool:
    return bool(lo <= pred <= hi)


def _checked(plug_in: float, corrected: float | None) -> float:
    """The prediction a point is checked against: without its K-sample bias where the jackknife
    moved it by at most `MAX_TRUSTED_SHIFT` (at the evaluation's K = 2 it doubles every estimate,
    a correction the dual's own summary calls untrustworthy), else the K-sample value."""
    return corrected if trusted_correction(plug_in, corrected) else plug_in


def summarize(root: Path, points: list[tuple[str, Path]], kind: str) -> dict:
    """sweep.json's content: per point λ*, margins, and for reward, each safety score, KL and
    the unsafe rate the predicted value, the achieved one with its 95% CI, and whether the
    prediction holds (inside the CI; KL within ±35% of the prediction or inside the CI);
    the behavioural rates where the run has them."""
    rows = []
    for name, run in points:
        dual = DualRecord.read(run / "dual.json")
        ev = json.loads((run / "eval.json").read_text())
        row = {"point": name, "run": str(run.relative_to(root)), "lambda": list(dual.lam),
               "margins": list(dual.margins), "ess_fraction": dual.predicted.ess_fraction, "scores": {}}
        for col, s in ev["scores"].items():
            lo, hi = s["achieved_gain_ci"]
            # the check uses the prediction for the measured (held-out) prompts where there is one,
            # without its K-sample bias where the correction can be trusted
            here = s.get("predicted_gain_held_out")
            checked = (_checked(here, s.get("predicted_gain_held_out_corrected")) if here is not None
                       else _checked(s["predicted_gain"], s.get("predicted_gain_corrected")))
            row["scores"][col] = {"predicted": s["predicted_gain"], "predicted_held_out": here,
                                  "predicted_corrected": s.get("predicted_gain_corrected"),
                                  "predicted_held_out_corrected": s.get("predicted_gain_held_out_corrected"),
                                  "checked": checked, "achieved": s["achieved_gain"], "achieved_ci": [lo, hi],
                                  "holds": _within(checked, lo, hi)}
            if "unsafe_rate_trained" in s:
                c = dual.constraint(col)
                row["scores"][col].update(unsafe_rate_reference=s["unsafe_rate_reference"],
                                          unsafe_rate_trained=s["unsafe_rate_trained"],
                                          unsafe_rate_predicted=None if c is None else c.predicted_unsafe_rate)
        kl = ev["kl"]
        lo, hi = kl["achieved_ci"]
        # at the log K ceiling the dual's KL is a lower bound, not a prediction: nothing to hold.
        # Otherwise the KL checked is the dual's without its K-sample bias (the held-out prompts'
        # reference samples are usually fewer per prompt, so their KL is the more biased one)
        bound = kl_at_sample_ceiling(dual)
        corrected = (dual.predicted.bias_corrected or {}).get("kl")
        checked = _checked(kl["predicted"], corrected)
        row["kl"] = {"predicted": kl["predicted"], "predicted_corrected": corrected, "checked": checked,
                     "achieved": kl["achieved"], "achieved_ci": [lo, hi], "predicted_is_lower_bound": bound,
                     "holds": None if bound else bool(_within(checked, lo, hi)
                                                      or abs(kl["achieved"] - checked) <= KL_TOLERANCE * checked)}
        for key in ("learned_tilt", "learned_tilt_training_samples"):
            if ev.get(key):
                row[key] = ev[key]
        if "behaviour" in ev:
            row["behaviour"] = {suite: {"metric": s["metric"], **{m: s["models"][m] for m in s["models"]}}
                                for suite, s in ev["behaviour"]["suites"].items()}
        rows.append(row)
    return {"kind": kind, "points": rows,
            "holds": {"all": all(r["kl"]["holds"] is not False and all(s["holds"] for s in r["scores"].values())
                                 for r in rows)}}


def _ci(v: float, ci) -> str:
    return f"{v:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def format_sweep_table(summary: dict) -> str:
    """The paper's table in Markdown: one row per point and score, predicted next to achieved."""
    lines = ["| point | λ* | score | predicted: dual's prompts | predicted: held-out | achieved [95% CI] | holds |",
             "|---|---:|---|---:|---:|---|---|"]

    def pred(v, corrected, sign="+"):  # "K-sample estimate → without its bias"
        if v is None:
            return "–"
        return f"{v:{sign}.3f}" + ("" if corrected is None else f" → {corrected:{sign}.3f}")

    for r in summary["points"]:
        lam = ", ".join(f"{x:.3g}" for x in r["lambda"]) + (" (not binding)" if not any(r["lambda"]) else "")
        for col, s in r["scores"].items():
            dual_text = pred(s["predicted"], s.get("predicted_corrected"))
            lines.append(f"| {r['point']} | {lam} | {col} gain | {dual_text} | "
                         f"{pred(s.get('predicted_held_out'), s.get('predicted_held_out_corrected'))} | "
                         f"{_ci(s['achieved'], s['achieved_ci'])} | {'yes' if s['holds'] else '**no**'} |")
        k = r["kl"]
        text, holds = ((f"≥ {k['predicted']:.3f} (not predicted)", "–") if k.get("predicted_is_lower_bound")
                       else (pred(k["predicted"], k.get("predicted_corrected"), ""), "yes" if k["holds"] else "**no**"))
        lines.append(f"| {r['point']} | {lam} | KL, nats | {text} | – | "
                     f"{k['achieved']:.3f} [{k['achieved_ci'][0]:.3f}, {k['achieved_ci'][1]:.3f}] | {holds} |")
        if r.get("learned_tilt"):
            t = r["learned_tilt"]
            seen = r.get("learned_tilt_training_samples")
            lines.append(f"| {r['point']} | {lam} | tilt learned (slope) | 1 | – | "
                         f"{t['slope']:.3f} [{t['slope_ci'][0]:.3f}, {t['slope_ci'][1]:.3f}]"
                         + (f"; on its training samples {seen['slope']:.3f}" if seen else "") + " | – |")
    out = ["# dualign sweep", "", "Predicted by the dual before training (on the training prompts' π_ref samples, "
           "and with λ* on π_ref's samples of the held-out prompts) against what each trained model achieved on "
           "the held-out prompts (95% bootstrap CI over prompts); a gain holds when the held-out prediction (the "
           "dual's where there is none) lies inside the CI. A prediction reads `K-sample estimate → without its "
           "bias`: a reweighting of K samples per prompt under-predicts how far π_λ* moves, and the jackknife over "
           "each prompt's samples removes most of that bias; the check uses the corrected value where the "
           f"correction moved it by at most {MAX_TRUSTED_SHIFT:.0%} (beyond that the jackknife's 1/K expansion "
           "fails: with 2 samples per prompt it doubles every estimate), else the K-sample one. "
           f"KL holds when within ±{KL_TOLERANCE:.0%} of the prediction or inside the CI; where the dual's KL "
           "sits at its sample ceiling (half of log K or more) it is only a lower bound and is not checked. "
           "\"Tilt learned\" is the slope of the trained model's log π_θ/π_ref on r_λ/β over π_ref's samples of "
           "the held-out prompts, within each prompt (1: the model is π_λ* there, 0: it learned none of the "
           "tilt): a miss with a slope near 0 is the training's, not the prediction's.", "",
           *lines]
    beh = [r for r in summary["points"] if r.get("behaviour")]
    if beh:
        suites = list(beh[0]["behaviour"])
        out += ["", "Behaviour (refusal-phrase detector; harmful: refusal, benign/borderline: over-refusal):", "",
                "| point | " + " | ".join(suites) + " |", "|---|" + "---:|" * len(suites)]
        ref = beh[0]["behaviour"]
        out.append("| π_ref | " + " | ".join(f"{ref[s]['reference']['rate']:.0%}" for s in suites) + " |")
        for r in beh:
            out.append(f"| {r['point']} | " + " | ".join(
                f"{r['behaviour'][s]['trained']['rate']:.0%} [{r['behaviour'][s]['trained']['ci'][0]:.0%}, "
                f"{r['behaviour'][s]['trained']['ci'][1]:.0%}]" for s in suites) + " |")
    return "\n".join(out) + "\n"


def plot_frontier(summary: dict, arrays, beta: float, path) -> Path:
    """Reward gain against the first safety score's gain: the dual's predicted curve
    (π_λ for λ from 0 to 1000, on the shared samples), each trained
    model's achieved point with 95% CI bars, the reference at the origin. `arrays`: the shared
    samples' `ScoreArrays`."""
    from ..dual import DualProblem
    from ..eval.figures import _pyplot, _save

    problem = DualProblem(arrays.reward, arrays.safety, beta, 0.0)
    # λ from 0 (the reward alone) to where safety dominates any score scale: the whole frontier
    lams = np.concatenate([[0.0], np.logspace(-3, 3, 80)])
    preds = [problem.predict(np.full(problem.m, lam)) for lam in lams]
    col = arrays.safety_names[0]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([p.safety_gain[0] for p in preds], [p.reward_gain for p in preds], "-", color="0.5", lw=1.2,
            label="predicted (π_λ, dual)")
    for r in summary["points"]:
        s, w = r["scores"][col], r["scores"]["reward"]
        bars = ax.errorbar(s["achieved"], w["achieved"],
                           xerr=[[s["achieved"] - s["achieved_ci"][0]], [s["achieved_ci"][1] - s["achieved"]]],
                           yerr=[[w["achieved"] - w["achieved_ci"][0]], [w["achieved_ci"][1] - w["achieved"]]],
                           fmt="o", capsize=3, label=f"{r['point']}: achieved")
        ax.plot(s["predicted"], w["predicted"], "x", color="k", ms=6)
        if s.get("predicted_held_out") is not None and w.get("predicted_held_out") is not None:
            # the prediction for the held-out prompts, in the point's colour: what the dots are checked against
            ax.plot(s["predicted_held_out"], w["predicted_held_out"], "D", mfc="none", ms=7,
                    color=bars[0].get_color())
    ax.plot(0, 0, "s", color="k", label="π_ref")
    ax.set_xlabel(f"{col} gain over π_ref")
    ax.set_ylabel("reward gain over π_ref")
    ax.set_title("Predicted on the dual's prompts (x, curve) and on the held-out\nprompts (◇) vs achieved there "
                 "(dots, 95% CI)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)
