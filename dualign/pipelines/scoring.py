"""Score a table of (prompt, response) rows with reward and safety models, or with a
policy's log-probs, into scores.parquet.

Shared by `dualign score`, the pipelines' score stage and their evaluation; each column is
skipped when the file already holds it computed from the same samples with the same spec.
Log-probs are columns `logp/<name>` (PeCAN's implicit scores, the evaluation's KL), cached
with their provenance (model identity, tokenization, samples digest) like any score column.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from ..errors import InputError
from ..models.scorers import (check_safety_sign, column_is_current, load_scorer, parse_named,
                              read_samples, write_scores)
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


REF = "ref"  # π_ref's log-prob column is logp/ref


@dataclass
class LogProbModel:
    """A policy whose sequence log-probs become the column `logp/<name>`.

    Attributes
    ----------
    name : str
        Column suffix ("ref", "helpful", "safety_<constraint>").
    ident : str
        Identity recorded as the column's provenance (a spec, or a checkpoint path with the
        digest of its weights): a changed model invalidates the cached column.
    load : callable() -> (model, tokenizer)
        Loads the model; called only when some table lacks a current column.
    """

    name: str
    ident: str
    load: Callable


def logprob_columns(samples_paths: list, models: list[LogProbModel], *, template: str | None = None,
                    append_eos: bool = True, max_length: int | None = None, batch_size: int = 8,
                    force: bool = False, log=print) -> None:
    """Add `logp/<name>` for every model to the scores.parquet next to each samples file.

    Each model is loaded at most once, for all the tables that lack its current column.
    Tokenization (`template`, `append_eos`, `max_length`) must be the one the pre-aligned
    models were trained with, since their log-ratios are what DPO fitted.
    """
    from ..models.logprobs import logprobs, samples_append_eos

    paths = [Path(p) for p in samples_paths]
    digests = {p: file_digest(p) for p in paths}
    for m in models:
        col = f"logp/{m.name}"
        prov = {p: {"model": m.ident, "template": template, "append_eos": append_eos,
                    "max_length": max_length, "samples": digests[p]} for p in paths}
        todo = [p for p in paths if force or not column_is_current(p.parent / "scores.parquet", col, prov[p])]
        if not todo:
            continue
        model, tok = m.load()
        for p in todo:
            samples = read_samples(p)
            lp, _ = logprobs(model, tok, samples["prompt"].tolist(), samples["response"].tolist(),
                             batch_size=batch_size, template=template,
                             append_eos=samples_append_eos(samples, append_eos),
                             max_length=max_length)
            write_scores(p.parent / "scores.parquet", samples, {col: lp}, provenance={col: prov[p]})
            log(f"{p.parent / 'scores.parquet'}: {col} for {len(lp)} responses (mean {lp.mean():.2f} nats)")
        del model
