"""Pseudo-preference pairs (docs/design.md §3): response pairs labeled by r_λ = r + λᵀg.

Pairs come from the reference's own samples (pairs of the K responses to a prompt) or from
a preference dataset whose two responses get scored (the paper relabels PKU-SafeRLHF).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..dual.unsafe_rate import unsafe_indicator
from ..train.losses import pseudo_preference_labels

if TYPE_CHECKING:
    from .dual_stage import DualRecord


def pairs_from_samples(scores: pd.DataFrame, pairs_per_prompt: int = 2, seed: int = 0) -> pd.DataFrame:
    """Draw response pairs among the K samples of each prompt, with their scores.

    Parameters
    ----------
    scores : DataFrame
        One row per sample: prompt_id, sample_id, prompt, response and score columns
        (`reward`, `safety/<name>`, ...).
    pairs_per_prompt : int
        Distinct unordered pairs per prompt (at most K(K−1)/2), drawn without replacement.
    seed : int

    Returns
    -------
    DataFrame with prompt_id, prompt, response_0, response_1, sample_0, sample_1 and every
    score column twice, suffixed `_0` and `_1`.
    """
    rng = np.random.default_rng(seed)
    score_cols = [c for c in scores.columns if c not in ("prompt_id", "sample_id", "prompt", "response")]
    rows = []
    for pid, grp in scores.sort_values(["prompt_id", "sample_id"]).groupby("prompt_id", sort=True):
        k = len(grp)
        combos = [(i, j) for i in range(k) for j in range(i + 1, k)]
        take = rng.choice(len(combos), size=min(pairs_per_prompt, len(combos)), replace=False)
        recs = grp.to_dict("records")
        for t in sorted(take):
            i, j = combos[t]
            if rng.random() < 0.5:  # random order: the label, not the position, carries the preference
                i, j = j, i
            a, b = recs[i], recs[j]
            row = {"prompt_id": pid, "prompt": a["prompt"], "response_0": a["response"],
                   "response_1": b["response"], "sample_0": a["sample_id"], "sample_1": b["sample_id"]}
            for c in score_cols:
                row[f"{c}_0"], row[f"{c}_1"] = a[c], b[c]
            rows.append(row)
    return pd.DataFrame(rows)


def combined_score(pairs: pd.DataFrame, side: int, reward: str, safety: list[str], lam,
                   indicator=None) -> np.ndarray:
    """r_λ = r + λᵀg of response `side` (0 or 1) of every pair, shape (n,).

    `indicator` (one bool per safety column, default all False) marks the constraints stated
    as a maximum unsafe rate: their g is `unsafe_indicator` of the column, −1{unsafe}, the
    score their λ* was solved for, not the raw safety score."""
    flags = [False] * len(safety) if indicator is None else list(indicator)
    if len(flags) != len(safety):
        raise ValueError(f"{len(flags)} indicator flags for {len(safety)} safety scores")
    out = pairs[f"{reward}_{side}"].to_numpy(np.float64).copy()
    for lam_j, name, ind in zip(np.atleast_1d(lam), safety, flags):
        g = pairs[f"{name}_{side}"].to_numpy(np.float64)
        out += float(lam_j) * (unsafe_indicator(g) if ind else g)
    return out


def rate_constraints(dual: DualRecord, safety: list[str]) -> list[bool]:
    """Which of the `safety` columns the dual record `dual` states as a maximum unsafe rate
    (constraint `kind` "max_unsafe_rate"): the `indicator` of `label_pairs`.

    Raises
    ------
    ValueError
        A column the record has no constraint for (labels would weigh it with no λ*)."""
    rate = {c.name: c.is_rate for c in dual.constraints}
    missing = [c for c in safety if c not in rate]
    if missing:
        raise ValueError(f"the dual record has no constraint {', '.join(missing)} "
                         f"(its constraints: {', '.join(rate)})")
    return [rate[c] for c in safety]


def label_pairs(pairs: pd.DataFrame, lam, reward: str = "reward", safety: list[str] | None = None,
                scale: float = 1.0, indicator=None) -> pd.DataFrame:
    """Add `score_0`, `score_1` (r_λ of each response) and the soft label
    `label` = σ(scale · (r_λ(y1) − r_λ(y0))) (docs/design.md §3; `scale` = 1 is the label whose
    DPO optimum is π_λ; PeCAN's paper-code variant uses 1/β); returns a new DataFrame.
    `indicator` marks rate constraints, whose g is −1{unsafe} (`combined_score`)."""
    safety = list(safety or [])
    if len(np.atleast_1d(lam)) != len(safety):
        raise ValueError(f"{len(np.atleast_1d(lam))} multipliers for {len(safety)} safety scores")
    out = pairs.copy()
    out["score_0"] = combined_score(pairs, 0, reward, safety, lam, indicator)
    out["score_1"] = combined_score(pairs, 1, reward, safety, lam, indicator)
    out["label"] = pseudo_preference_labels(scale * out["score_1"], scale * out["score_0"])
    return out


def labels_decided_by_constraints(labeled: pd.DataFrame, reward: str = "reward") -> dict:
    """How much λ* changed the labels of `label_pairs`' output, against the reward alone
    (λ = 0): `flipped`, pairs whose preferred response differs; `moved`, pairs whose label
    moved by more than 0.1; `n`, all pairs. When few flip, the trained model is close to the
    one the reward alone would give, whatever the margin: the constraint does not bind on
    these pairs, only on π_ref's samples the dual saw."""
    by_reward = np.asarray(pseudo_preference_labels(labeled[f"{reward}_1"], labeled[f"{reward}_0"]))
    label = labeled["label"].to_numpy()
    return {"n": int(len(label)), "flipped": int(((label > 0.5) != (by_reward > 0.5)).sum()),
            "moved": int((np.abs(label - by_reward) > 0.1).sum())}


def labels_decided_line(labeled: pd.DataFrame) -> str:
    """`labels_decided_by_constraints` as the pairs stage logs it, with a warning when λ*
    flips fewer than 5% of the labels."""
    d = labels_decided_by_constraints(labeled)
    return (f"λ* decides {d['flipped']} of {d['n']} labels (the preferred response differs from the reward's "
            f"alone); {d['moved']} move by more than 0.1"
            + ("  ← the constraint hardly binds on these pairs: the model trained is nearly the reward's"
               if d["flipped"] < 0.05 * d["n"] else ""))


def trl_export(pairs: pd.DataFrame) -> pd.DataFrame:
    """TRL's prompt/chosen/rejected view: the response with label > 0.5 is `chosen`; the
    soft label is kept as `label` (P(chosen preferred)) for trainers that use it."""
    first = pairs["label"].to_numpy() > 0.5
    return pd.DataFrame({
        "prompt": pairs["prompt"],
        "chosen": np.where(first, pairs["response_1"], pairs["response_0"]),
        "rejected": np.where(first, pairs["response_0"], pairs["response_1"]),
        "label": np.where(first, pairs["label"], 1 - pairs["label"]),
    })


def dataset_as_samples(prefs: pd.DataFrame) -> pd.DataFrame:
    """A preference table's two responses as a samples table (prompt_id = pair index,
    sample_id = 0/1), so the scoring machinery of samples scores them unchanged."""
    n = len(prefs)
    return pd.DataFrame({
        "prompt_id": np.repeat(np.arange(n), 2), "sample_id": np.tile([0, 1], n),
        "prompt": np.repeat(prefs["prompt"].to_numpy(), 2),
        "response": np.column_stack([prefs["response_0"], prefs["response_1"]]).ravel(),
    })


def pairs_from_scored_dataset(scores: pd.DataFrame) -> pd.DataFrame:
    """Inverse of `dataset_as_samples` after scoring: one row per pair, score columns `_0`/`_1`."""
    s = scores.sort_values(["prompt_id", "sample_id"])
    a, b = s[s.sample_id == 0].reset_index(drop=True), s[s.sample_id == 1].reset_index(drop=True)
    out = pd.DataFrame({"prompt_id": a["prompt_id"], "prompt": a["prompt"],
                        "response_0": a["response"], "response_1": b["response"]})
    for c in s.columns:
        if c not in ("prompt_id", "sample_id", "prompt", "response"):
            out[f"{c}_0"], out[f"{c}_1"] = a[c].to_numpy(), b[c].to_numpy()
    return out
