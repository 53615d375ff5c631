"""Long-format score tables (one row per prompt × sample) ⇄ the (N, K[, m]) arrays the dual needs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import InputError
from ..runio import read_table

SAFETY_PREFIX = "safety/"


@dataclass
class ScoreArrays:
    """Scores of K reference samples for N prompts.

    Attributes
    ----------
    reward : ndarray (N, K)
    safety : ndarray (N, K, m)
    safety_names : list of str, length m (the table's column names)
    prompt_ids : ndarray (N,)
    """

    reward: np.ndarray
    safety: np.ndarray
    safety_names: list
    prompt_ids: np.ndarray


def default_safety_columns(columns) -> list[str]:
    """`safety` if present, else every `safety/<name>` column (what `dualign score` writes)."""
    if "safety" in columns:
        return ["safety"]
    return [c for c in columns if str(c).startswith(SAFETY_PREFIX)]


def scores_to_arrays(df: pd.DataFrame, reward: str = "reward", safety: list[str] | None = None,
                     prompt_id: str = "prompt_id", source: str = "scores") -> ScoreArrays:
    """Pivot a long score table into arrays, rows grouped by prompt and ordered by `sample_id`.

    Raises
    ------
    InputError
        A missing column, a non-numeric or non-finite score (naming the row), or prompts with
        different numbers of samples (the dual needs the same K for every prompt).
    """
    safety = list(safety) if safety else default_safety_columns(df.columns)
    if not safety:
        raise InputError("no safety column: name one with --safety (columns are: "
                         f"{', '.join(map(str, df.columns))})", file=source, field="safety")
    for col in [prompt_id, reward, *safety]:
        if col not in df.columns:
            raise InputError(f"missing column (columns are: {', '.join(map(str, df.columns))})",
                             file=source, field=col)
    for col in [reward, *safety]:
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise InputError(f"not a finite number: {df[col].iloc[bad[0]]!r}", file=source,
                             record=int(bad[0]), field=col)
    order = [prompt_id] + (["sample_id"] if "sample_id" in df.columns else [])
    df = df.sort_values(order, kind="stable")
    counts = df.groupby(prompt_id, sort=False).size()
    if counts.nunique() != 1:
        k = int(counts.mode().iloc[0])
        odd = counts[counts != k].index[0]
        raise InputError(f"prompt {odd!r} has {counts[odd]} samples but most prompts have {k}; "
                         "the dual needs the same number of samples for every prompt",
                         file=source, field=prompt_id)
    n, k = len(counts), int(counts.iloc[0])
    R = df[reward].to_numpy(np.float64).reshape(n, k)
    G = df[safety].to_numpy(np.float64).reshape(n, k, len(safety))
    return ScoreArrays(reward=R, safety=G, safety_names=safety,
                       prompt_ids=df[prompt_id].to_numpy()[::k])


def read_score_arrays(path, reward: str = "reward", safety: list[str] | None = None,
                      prompt_id: str = "prompt_id") -> ScoreArrays:
    """`scores_to_arrays` of a Parquet / CSV / JSONL file."""
    return scores_to_arrays(read_table(path), reward, safety, prompt_id, source=str(path))


def synthetic_scores(n_prompts: int = 200, k: int = 16, seed: int = 0) -> pd.DataFrame:
    """A small synthetic score table, shaped like scores of a real reference model.

    Rewards and safety are drawn per prompt with a prompt effect (some prompts are harder)
    and a *negative* within-prompt correlation (the more helpful answer to a harmful request
    tends to be the less safe one): the tension that makes the constraint bite. About a
    third of the samples are unsafe (safety < 0). Used by `dualign demo --dual-only`.
    """
    rng = np.random.default_rng(seed)
    harmful = rng.random(n_prompts) < 0.5
    prompt_r = rng.normal(0.0, 1.0, n_prompts)
    prompt_g = np.where(harmful, rng.normal(-1.0, 0.8, n_prompts), rng.normal(2.0, 0.5, n_prompts))
    e_r = rng.normal(size=(n_prompts, k))
    rho = np.where(harmful, -0.6, 0.2)[:, None]
    e_g = rho * e_r + np.sqrt(1 - rho ** 2) * rng.normal(size=(n_prompts, k))
    # Scale 0.2: score spreads comparable to β = 0.1, so the tilt keeps several samples per prompt.
    reward = 0.2 * (prompt_r[:, None] + 1.0 * e_r)
    safety = 0.2 * (prompt_g[:, None] + np.where(harmful, 1.5, 0.5)[:, None] * e_g)
    return pd.DataFrame({
        "prompt_id": np.repeat(np.arange(n_prompts), k),
        "sample_id": np.tile(np.arange(k), n_prompts),
        "reward": reward.ravel().round(6),
        "safety": safety.ravel().round(6),
    })
