"""PeCAN's implicit scores (docs/design.md §4): r̂ = β log π_r/π_ref and ĝ_j = β log π_gj/π_ref.

A policy trained by DPO (same β) on preferences that follow a score s is
π ∝ π_ref exp(s/β), so β log π(y|x)/π_ref(y|x) = s(x, y) − β log Z(x): the score up to a
prompt-only constant. That constant cancels wherever PeCAN uses the scores — in the dual
(a per-prompt shift leaves the softmax over a prompt's samples unchanged, and every
constraint is measured relative to π_ref on the same prompts) and in the pairwise labels
(both responses share the prompt) — so the implicit scores stand in for a reward and a
cost model.

The log-probs are `logp/<name>` columns of a samples table's scores.parquet
(`scoring.logprob_columns`); the implicit scores are derived columns `reward` and
`safety/<name>`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..data.scores import read_samples, write_scores
from .scoring import REF


def implicit_scores(logp_policy, logp_ref, beta: float) -> np.ndarray:
    """β (log π(y|x) − log π_ref(y|x)): the score a DPO-trained π encodes, up to a prompt-only
    constant.

    Parameters
    ----------
    logp_policy, logp_ref : array_like, shape (n,)
        Sequence log-probabilities (nats) of the same responses under π and π_ref.
    beta : float
        The KL coefficient π was trained with.

    Returns
    -------
    numpy.ndarray, shape (n,), float64

    Raises
    ------
    ValueError
        Shapes differ or β <= 0.
    """
    a = np.asarray(logp_policy, dtype=np.float64)
    b = np.asarray(logp_ref, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"logp_policy has shape {a.shape} but logp_ref has shape {b.shape}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return beta * (a - b)


def add_implicit_columns(samples_path, policy_of: dict[str, str], beta: float) -> pd.DataFrame:
    """Write the implicit score columns from the `logp/` columns already in scores.parquet.

    Parameters
    ----------
    samples_path : path of samples.parquet (its scores.parquet is read and rewritten)
    policy_of : dict score column -> log-prob name
        E.g. {"reward": "helpful", "safety/harm": "safety_harm"}; each becomes
        β (logp/<name> − logp/ref).
    beta : float

    Returns
    -------
    pandas.DataFrame, the scores table as written.
    """
    out = Path(samples_path).parent / "scores.parquet"
    table = pd.read_parquet(out)
    cols = {c: implicit_scores(table[f"logp/{n}"], table[f"logp/{REF}"], beta) for c, n in policy_of.items()}
    if all(c in table.columns and np.array_equal(table[c].to_numpy(), v) for c, v in cols.items()):
        return table  # current: leave the file (and its timestamp) alone
    prov = {c: {"implicit": f"beta*(logp/{n} - logp/{REF})", "beta": beta} for c, n in policy_of.items()}
    return write_scores(out, read_samples(samples_path), cols, provenance=prov)
