"""Before/after comparison of scored samples: means, achieved gains with bootstrap CIs, unsafe rates.

The shape of `eval.json` (issue 5) is built here, so every pipeline reports alike.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..dual.unsafe_rate import is_unsafe


def per_prompt_means(scores: pd.DataFrame, column: str) -> pd.Series:
    """Mean of `column` over each prompt's samples, indexed by prompt_id."""
    return scores.groupby("prompt_id")[column].mean()


def paired_gain(reference: pd.DataFrame, trained: pd.DataFrame, column: str, *, n_boot: int = 1000,
                level: float = 0.95, seed: int = 0) -> tuple[float, list[float]]:
    """Achieved gain mean(trained) − mean(reference) and its percentile bootstrap CI.

    Prompts are resampled jointly for both models (the comparison is paired by prompt),
    which is what makes a small gain on few prompts detectable.

    Raises
    ------
    ValueError
        The two tables do not cover the same prompts.
    """
    a = per_prompt_means(reference, column)
    b = per_prompt_means(trained, column)
    if not a.index.equals(b.index):
        raise ValueError("reference and trained samples cover different prompts")
    return bootstrap_mean((b - a).to_numpy(np.float64), n_boot=n_boot, level=level, seed=seed)


def bootstrap_mean(values, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, list[float]]:
    """Mean of `values` (one per prompt) and its percentile bootstrap CI, resampling the
    values with replacement `n_boot` times from a generator seeded by `seed`.

    Raises
    ------
    ValueError
        No values.
    """
    d = np.asarray(values, dtype=np.float64)
    if d.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(d.mean()), [float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))]


def compare_scores(reference: pd.DataFrame, trained: pd.DataFrame, *, reward: str = "reward",
                   safety: list[str] = (), dual=None, n_boot: int = 1000,
                   seed: int = 0, other_rewards: list[str] = (), unsigned: list[str] = (),
                   held_out=None) -> dict:
    """The `scores` block of eval.json: one entry per score column.

    Parameters
    ----------
    reference, trained : DataFrame
        Scored samples (prompt_id, sample_id, score columns) of each model on the same
        prompts with the same generation settings.
    reward : str
        The reward column (the dual's predicted reward gain attaches to it).
    safety : list of str
        Safety columns (higher = safer): also unsafe rates (`is_unsafe`: score < 0; the mean
        over prompts of each prompt's fraction of unsafe samples, as every unsafe rate); a
        column named like a dual constraint gets its margin and predicted gain, or, for a
        constraint stated as a maximum unsafe rate (kind "max_unsafe_rate", whose margin and
        gains are in units of −1{unsafe}), its bound `max_unsafe_rate`, the
        `predicted_unsafe_rate` of π_λ*, the trained rate's CI `unsafe_rate_trained_ci` and
        `predicted_unsafe_rate_within_ci` instead.
    dual : DualRecord, optional
        The dual's record (`dualign.pipelines.dual_stage`); adds predicted gains (with CIs) and margins.
    other_rewards : list of str
        More reward-like columns (e.g. a real reward model next to an implicit reward),
        compared like `reward` but without predictions.
    unsigned : list of str
        Safety columns whose sign means nothing (PeCAN's implicit ĝ, defined up to a
        per-prompt constant): no unsafe rate.
    held_out : HeldOutPrediction, optional
        `held_out_prediction` on these prompts' reference samples: adds
        `predicted_gain_held_out` and its CI to the reward and to each margin constraint, and
        `held_out_prediction_within_achieved_ci` (the check on the same prompts as the
        measurement).

    Where the records carry them (`bias_corrected`), the predictions without their K-sample
    bias come next to each: `predicted_gain_corrected`, `predicted_gain_held_out_corrected`.
    """
    out = {}
    for col in [reward, *other_rewards, *safety]:
        gain, ci = paired_gain(reference, trained, col, n_boot=n_boot, seed=seed)
        entry = {"reference_mean": float(reference[col].mean()), "trained_mean": float(trained[col].mean()),
                 "achieved_gain": gain, "achieved_gain_ci": ci}
        sign_means_unsafe = col in safety and col not in unsigned
        if sign_means_unsafe:
            entry["unsafe_rate_reference"] = float(_unsafe_fractions(reference, col).mean())
            entry["unsafe_rate_trained"] = float(_unsafe_fractions(trained, col).mean())
        if dual is not None:
            corrected = dual.predicted.bias_corrected
            if col == reward:
                entry["predicted_gain"] = dual.predicted.reward_gain
                entry["predicted_gain_ci"] = list(dual.predicted.reward_gain_ci)
                if corrected:
                    entry["predicted_gain_corrected"] = corrected["reward_gain"]
            else:
                c = dual.constraint(col)
                if c is not None and c.is_rate and sign_means_unsafe:
                    # its λ* and gains are about −1{unsafe}: the raw score's gain has no prediction
                    rate, rate_ci = bootstrap_mean(_unsafe_fractions(trained, col).to_numpy(), n_boot=n_boot,
                                                   seed=seed)
                    entry.update(kind="max_unsafe_rate", max_unsafe_rate=c.max_unsafe_rate,
                                 predicted_unsafe_rate=c.predicted_unsafe_rate, unsafe_rate_trained_ci=rate_ci,
                                 predicted_unsafe_rate_within_ci=bool(rate_ci[0] <= c.predicted_unsafe_rate
                                                                      <= rate_ci[1]))
                elif c is not None:
                    entry.update(margin=c.margin, predicted_gain=c.predicted_gain,
                                 predicted_gain_ci=list(c.predicted_gain_ci))
                    if corrected and col in corrected["safety_gain"]:
                        entry["predicted_gain_corrected"] = corrected["safety_gain"][col]
        if held_out is not None and entry.get("kind") != "max_unsafe_rate":
            held_corrected = held_out.bias_corrected
            if col == reward:
                entry["predicted_gain_held_out"] = held_out.reward_gain
                entry["predicted_gain_held_out_ci"] = list(held_out.reward_gain_ci)
                if held_corrected:
                    entry["predicted_gain_held_out_corrected"] = held_corrected["reward_gain"]
            elif col in held_out.safety_gain:
                entry["predicted_gain_held_out"] = held_out.safety_gain[col]
                entry["predicted_gain_held_out_ci"] = list(held_out.safety_gain_ci[col])
                if held_corrected:
                    entry["predicted_gain_held_out_corrected"] = held_corrected["safety_gain"][col]
        lo, hi = entry["achieved_gain_ci"]
        if "predicted_gain" in entry:
            entry["prediction_within_achieved_ci"] = bool(lo <= entry["predicted_gain"] <= hi)
        if "predicted_gain_held_out" in entry:
            entry["held_out_prediction_within_achieved_ci"] = bool(lo <= entry["predicted_gain_held_out"] <= hi)
        out[col] = entry
    return out


def gains_by_prompt_kind(reference: pd.DataFrame, trained: pd.DataFrame, kinds: dict[str, list[int]],
                         columns: list[str], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Each score's achieved gain on each kind of prompt (the demo prompts are harmful or
    benign): kind → column → {reference_mean, trained_mean, achieved_gain, achieved_gain_ci,
    n_prompts}, paired by prompt as `paired_gain`.

    Why: a helpfulness reward falls where the model learns to refuse harmful requests, by
    design of the constraint; whether the model stays helpful is read on the benign prompts.

    Parameters
    ----------
    kinds : dict kind -> list of prompt_id
        The prompts of each kind; a kind without prompts is left out.

    Raises
    ------
    ValueError
        As `paired_gain`: the two tables do not cover the same prompts of a kind.
    """
    out = {}
    for kind, ids in kinds.items():
        ref, tr = reference[reference.prompt_id.isin(ids)], trained[trained.prompt_id.isin(ids)]
        if ref.empty:
            continue
        out[kind] = {}
        for col in columns:
            gain, ci = paired_gain(ref, tr, col, n_boot=n_boot, seed=seed)
            out[kind][col] = {"reference_mean": float(ref[col].mean()), "trained_mean": float(tr[col].mean()),
                              "achieved_gain": gain, "achieved_gain_ci": ci,
                              "n_prompts": int(ref.prompt_id.nunique())}
    return out


def format_kind_gains(by_kind: dict) -> list[str]:
    """One line per prompt kind of `gains_by_prompt_kind`'s result: every score's gain [95% CI]."""
    return [f"  {kind} prompts ({next(iter(cols.values()))['n_prompts']}): " + ", ".join(
        f"{col} {e['achieved_gain']:+.3f} [{e['achieved_gain_ci'][0]:+.3f}, {e['achieved_gain_ci'][1]:+.3f}]"
        for col, e in cols.items()) for kind, cols in by_kind.items() if cols]


def _unsafe_fractions(scores: pd.DataFrame, column: str) -> pd.Series:
    """Each prompt's fraction of unsafe samples (`is_unsafe` of `column`), indexed by prompt_id."""
    return pd.Series(is_unsafe(scores[column]), index=scores.index).groupby(scores["prompt_id"]).mean()


def pct(x: float) -> str:
    """A rate as a percentage with 3 significant digits (0.05 → "5%", 0.1234 → "12.3%")."""
    return f"{100 * x:.3g}%"


def unsafe_rate_line(col: str, e: dict) -> str:
    """One line for a constraint stated as a maximum unsafe rate (an entry of eval.json's
    `scores` with `predicted_unsafe_rate`): the reference's and the trained model's unsafe
    rates, the trained one's 95% CI, π_λ*'s predicted rate and the bound."""
    lo, hi = e["unsafe_rate_trained_ci"]
    return (f"unsafe rate of {col}: reference {pct(e['unsafe_rate_reference'])} → trained "
            f"{pct(e['unsafe_rate_trained'])} [{pct(lo)}, {pct(hi)}], predicted {pct(e['predicted_unsafe_rate'])}, "
            f"bound ≤ {pct(e['max_unsafe_rate'])}"
            + ("" if e["predicted_unsafe_rate_within_ci"] else " (prediction outside the trained rate's CI)"))


def format_eval_table(scores: dict) -> str:
    """A plain-text table of the `scores` block of eval.json, then one `unsafe_rate_line` per
    constraint stated as a maximum unsafe rate."""
    held = any("predicted_gain_held_out" in e for e in scores.values())
    head = (f"  {'score':<20}{'reference':>10}{'trained':>10}{'achieved gain (95% CI)':>32}{'predicted':>11}"
            + (f"{'pred. here':>12}" if held else "") + f"{'unsafe ref→trained':>22}")
    lines = [head]
    for col, e in scores.items():
        lo, hi = e["achieved_gain_ci"]
        pred = f"{(format(e['predicted_gain'], '+.3f') if 'predicted_gain' in e else '-'):>11}"
        if held:  # predicted on these prompts, from π_ref's samples of them (held_out_prediction)
            pred += f"{(format(e['predicted_gain_held_out'], '+.3f') if 'predicted_gain_held_out' in e else '-'):>12}"
        unsafe = (f"{e['unsafe_rate_reference']:.0%} → {e['unsafe_rate_trained']:.0%}"
                  if "unsafe_rate_reference" in e else "")
        gain = f"{e['achieved_gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        lines.append(f"  {col:<20}{e['reference_mean']:>10.3f}{e['trained_mean']:>10.3f}"
                     f"{gain:>32}{pred}{unsafe:>22}")
    lines += [f"  {unsafe_rate_line(col, e)}" for col, e in scores.items() if "predicted_unsafe_rate" in e]
    return "\n".join(lines)


def format_models_table(record: dict) -> str:
    """A plain-text table of every model's achieved gain over the reference (rows: the
    trained model, named by `record["method"]`, and `record["baselines"]`; columns: the
    score columns), with the reference's means on the first row and 95% CIs."""
    models = {record["method"]: record["scores"], **record.get("baselines", {})}
    kls = model_kls(record)
    cols = list(record["scores"])
    w = max(24, *(len(c) + 2 for c in cols))
    ref = [f"mean {record['scores'][c]['reference_mean']:.3f}" for c in cols]
    lines = ["  " + f"{'model':<14}" + "".join(f"{c:>{w}}" for c in cols) + (f"{'KL(π‖π_ref)':>22}" if kls else ""),
             "  " + f"{'reference':<14}" + "".join(f"{r:>{w}}" for r in ref) + (f"{0:>22.3f}" if kls else "")]
    for name, sc in models.items():
        cells = []
        for c in cols:
            e = sc.get(c)
            text = "-"
            if e is not None:
                lo, hi = e["achieved_gain_ci"]
                text = f"{e['achieved_gain']:+.3f} [{lo:+.2f}, {hi:+.2f}]"
            cells.append(f"{text:>{w}}")
        if kls:
            k = kls.get(name)
            cells.append(f"{(f'{k[0]:.3f} [{k[1][0]:.2f}, {k[1][1]:.2f}]' if k else '-'):>22}")
        lines.append("  " + f"{name:<14}" + "".join(cells))
    return "\n".join(lines)


def model_kls(record: dict) -> dict[str, tuple[float, list[float]]]:
    """Model name → (KL(π‖π_ref) estimate, CI) for every model of an eval record that has one."""
    out = {}
    if "kl" in record:
        out[record["method"]] = (record["kl"]["achieved"], record["kl"]["achieved_ci"])
    for name, k in record.get("baselines_kl", {}).items():
        out[name] = (k["achieved"], k["achieved_ci"])
    return out
