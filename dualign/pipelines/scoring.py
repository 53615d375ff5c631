"""Score a table of (prompt, response) rows with reward and safety models into scores.parquet.

Shared by `dualign score`, the pipelines' score stage and their evaluation; each column is
skipped when the file already holds it computed from the same samples with the same spec.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import InputError
from ..models.scorers import (check_safety_sign, column_is_current, load_scorer, parse_named,
                              write_scores)
from ..runio import file_digest


def score_jobs(reward: str | None, safety: list[str] | dict | None) -> list[tuple[str, str, str]]:
    """(column, spec, role) for a reward spec and `NAME=SPEC` safety specs (or a name → spec
    dict), checking every safety sign before any model is loaded.

    Raises
    ------
    InputError
        Nothing to score, a safety spec without a declared sign, or a duplicate name.
    """
    if isinstance(safety, dict):
        safety = [f"{k}={v}" for k, v in safety.items()]
    safety = list(safety or [])
    if not reward and not safety:
        raise InputError("nothing to score: give a reward and/or safety scorers")
    jobs = [("reward", reward, "reward")] if reward else []
    for s in safety:
        name, spec = parse_named(s)
        check_safety_sign(spec, name)
        jobs.append((f"safety/{name}", spec, "safety"))
    if len({c for c, _, _ in jobs}) != len(jobs):
        raise InputError("two safety constraints share a name", field="safety")
    return jobs


def score_samples(samples_path, jobs, out, *, batch_size: int = 8, template: str | None = None,
                  dtype=None, device: str | None = None, log=print) -> pd.DataFrame:
    """Add one column per job to `out` (scores.parquet) for the samples in `samples_path`.

    Returns the scores table as written.
    """
    from ..models.scorers import read_samples

    samples = read_samples(samples_path)
    out = Path(out)
    digest = file_digest(samples_path)
    prompts, responses = samples["prompt"].tolist(), samples["response"].tolist()
    table = None
    for col, spec, role in jobs:
        prov = {"spec": spec, "template": template, "samples": digest}
        if column_is_current(out, col, prov):
            log(f"{out}: {col} is up to date")
            continue
        scorer = load_scorer(spec, batch_size=batch_size, template=template, dtype=dtype, device=device)
        values = scorer.reward(prompts, responses) if role == "reward" else scorer.safety(prompts, responses)
        scorer.close()
        table = write_scores(out, samples, {col: values}, provenance={col: prov})
        log(f"{col}: mean {values.mean():.4f}, sd {values.std():.4f} ({spec})")
    return table if table is not None else pd.read_parquet(out)
