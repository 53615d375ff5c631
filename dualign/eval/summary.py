"""Before/after comparison of scored samples: means, achieved gains with bootstrap CIs, unsafe rates.

The shape of `eval.json` (issue 5) is built here, so every pipeline reports alike.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


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
    d = (b - a).to_numpy(np.float64)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(d.mean()), [float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))]


def compare_scores(reference: pd.DataFrame, trained: pd.DataFrame, *, reward: str = "reward",
                   safety: list[str] = (), dual: dict | None = None, n_boot: int = 1000,
                   seed: int = 0, other_rewards: list[str] = (), unsigned: list[str] = ()) -> dict:
    """The `scores` block of eval.json: one entry per score column.

    Parameters
    ----------
    reference, trained : DataFrame
        Scored samples (prompt_id, sample_id, score columns) of each model on the same
        prompts with the same generation settings.
    reward : str
        The reward column (the dual's predicted reward gain attaches to it).
    safety : list of str
        Safety columns (higher = safer): also unsafe rates (score < 0); a column named like
        a dual constraint gets its margin and predicted gain.
    dual : dict, optional
        The dual.json record; adds predicted gains (with CIs) and margins.
    other_rewards : list of str
        More reward-like columns (e.g. a real reward model next to an implicit reward),
        compared like `reward` but without predictions.
    unsigned : list of str
        Safety columns whose sign means nothing (PeCAN's implicit ĝ, defined up to a
        per-prompt constant): no unsafe rate.
    """
    out = {}
    for col in [reward, *other_rewards, *safety]:
        gain, ci = paired_gain(reference, trained, col, n_boot=n_boot, seed=seed)
        entry = {"reference_mean": float(reference[col].mean()), "trained_mean": float(trained[col].mean()),
                 "achieved_gain": gain, "achieved_gain_ci": ci}
        if col in safety and col not in unsigned:
            entry["unsafe_rate_reference"] = float((reference[col] < 0).mean())
            entry["unsafe_rate_trained"] = float((trained[col] < 0).mean())
        if dual is not None:
            if col == reward:
                entry["predicted_gain"] = dual["predicted"]["reward_gain"]
                entry["predicted_gain_ci"] = dual["predicted"]["reward_gain_ci"]
            else:
                c = next((c for c in dual["constraints"] if c["name"] == col), None)
                if c is not None:
                    entry.update(margin=c["margin"], predicted_gain=c["predicted_gain"],
                                 predicted_gain_ci=c["predicted_gain_ci"])
        if "predicted_gain" in entry:
            lo, hi = entry["achieved_gain_ci"]
            entry["prediction_within_achieved_ci"] = bool(lo <= entry["predicted_gain"] <= hi)
        out[col] = entry
    return out


def format_eval_table(scores: dict) -> str:
    """A plain-text table of the `scores` block of eval.json."""
    head = f"  {'score':<20}{'reference':>10}{'trained':>10}{'achieved gain (95% CI)':>30}{'predicted':>11}{'unsafe ref→trained':>22}"
    lines = [head]
    for col, e in scores.items():
        lo, hi = e["achieved_gain_ci"]
        pred = f"{e['predicted_gain']:+.3f}" if "predicted_gain" in e else "-"
        unsafe = (f"{e['unsafe_rate_reference']:.0%} → {e['unsafe_rate_trained']:.0%}"
                  if "unsafe_rate_reference" in e else "")
        gain = f"{e['achieved_gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        lines.append(f"  {col:<20}{e['reference_mean']:>10.3f}{e['trained_mean']:>10.3f}"
                     f"{gain:>30}{pred:>11}{unsafe:>22}")
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
