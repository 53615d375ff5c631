"""Score a table of (prompt, response) rows with reward and safety models, or with a
policy's log-probs, into scores.parquet.

Shared by `dualign score`, the pipelines' score stage and their evaluation; each column is
skipped when the file already holds it computed from the same samples with the same spec, and
a killed scoring resumes from its last finished part (`score_samples`), as sampling does.
Log-probs are columns `logp/<name>` (PeCAN's implicit scores, the evaluation's KL), cached
with their provenance (model identity, tokenization, samples digest) like any score column.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import InputError
from ..models.scorers import (check_safety_sign, column_is_current, load_scorer, parse_named,
                              read_samples, write_scores)
from ..runio import digest as runio_digest
from ..runio import file_digest, open_partial_dir, write_parquet


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


# Scorer batches per part file. A part is the unit a killed scoring resumes from; 16 batches keep
# the loss small (seconds of a 7B scorer on a GPU) while a column of thousands of rows stays a
# few dozen files, and a trained head's feature cache (one chunk file per call) stays unsplintered.
PART_BATCHES = 16


def partial_dir(out) -> Path:
    """Where the finished parts of an interrupted scoring into `out` wait: `scores.partial/`
    next to `scores.parquet`, one sub-folder per column."""
    out = Path(out)
    return out.with_name(out.stem + ".partial")


def plan_parts(samples: pd.DataFrame, rows_per_part: int) -> list[np.ndarray]:
    """Row indices of each part: rows sorted by text length (prompt + response characters,
    longest first, ties by row) and cut into runs of `rows_per_part`, so that a part's
    batches hold texts of similar length (little padding). Depends on the samples alone.

    Returns
    -------
    list of numpy.ndarray of int64, every row 0..len(samples)-1 exactly once
    """
    n = len(samples)
    lengths = (samples["prompt"].astype(str).str.len() + samples["response"].astype(str).str.len()).to_numpy()
    order = np.lexsort((np.arange(n), -lengths)).astype(np.int64)
    return [order[i:i + rows_per_part] for i in range(0, n, rows_per_part)]


def _read_part(path: Path, rows: np.ndarray) -> np.ndarray | None:
    """The values of a finished part, or None when it is missing or does not hold exactly
    `rows` with finite values (then it is scored again)."""
    if not path.exists():
        return None
    try:
        df = pd.read_parquet(path)
        got, values = df["row"].to_numpy(np.int64), df["value"].to_numpy(np.float64)
    except Exception:  # a damaged part is only a part to redo
        return None
    if not np.array_equal(got, rows) or not np.all(np.isfinite(values)):
        return None
    return values


def score_samples(samples_path, jobs, out, *, batch_size: int = 8, template: str | None = None,
                  dtype=None, device: str | None = None, part_batches: int = PART_BATCHES,
                  log=print) -> pd.DataFrame:
    """Add one column per job to `out` (scores.parquet) for the samples in `samples_path`.

    A column already in `out` with the same provenance (spec, template, samples digest) is
    skipped. Otherwise the rows are scored in parts (`plan_parts`, `part_batches` batches of
    `batch_size` each), and every finished part is written atomically under
    `partial_dir(out)/<column digest>/`, keyed by the spec, template, samples digest, batch
    size, part plan, dtype and device. A killed run rerun with the same settings scores only
    the parts it lacks and writes the same scores.parquet, byte for byte, as an uninterrupted
    one; the parts are deleted once the column is in `out`.

    Returns the scores table as written.
    """
    samples = read_samples(samples_path)
    out = Path(out)
    digest = file_digest(samples_path)
    prompts = np.array(samples["prompt"].tolist(), dtype=object)
    responses = np.array(samples["response"].tolist(), dtype=object)
    rows_per_part = max(1, int(batch_size)) * max(1, int(part_batches))
    parts = plan_parts(samples, rows_per_part)
    table = None
    for col, spec, role in jobs:
        prov = {"spec": spec, "template": template, "samples": digest}
        folder = partial_dir(out) / runio_digest(col, 12)
        if column_is_current(out, col, prov):
            log(f"{out}: {col} is up to date")
            shutil.rmtree(folder, ignore_errors=True)
            continue
        # compared as JSON (a callable spec by its str: never reused across processes)
        settings = json.loads(json.dumps(
            {"column": col, "role": role, "provenance": prov, "batch_size": batch_size,
             "rows_per_part": rows_per_part, "n_rows": len(samples), "dtype": dtype, "device": device},
            sort_keys=True, default=str))
        open_partial_dir(folder, settings)
        values = np.zeros(len(samples))
        todo = []
        for i, rows in enumerate(parts):
            got = _read_part(folder / f"part-{i:06d}.parquet", rows)
            if got is None:
                todo.append(i)
            else:
                values[rows] = got
        if len(todo) < len(parts):
            log(f"{col}: resuming, {len(parts) - len(todo)} of {len(parts)} parts already scored")
        if todo:
            scorer = load_scorer(spec, batch_size=batch_size, template=template, dtype=dtype, device=device)
            score = scorer.reward if role == "reward" else scorer.safety
            try:
                for i in todo:
                    rows = parts[i]
                    v = score(prompts[rows].tolist(), responses[rows].tolist())
                    write_parquet(pd.DataFrame({"row": rows, "value": v}), folder / f"part-{i:06d}.parquet")
                    values[rows] = v
            finally:
                scorer.close()
        table = write_scores(out, samples, {col: values}, provenance={col: prov})
        shutil.rmtree(folder, ignore_errors=True)
        _remove_if_empty(partial_dir(out))
        log(f"{col}: mean {values.mean():.4f}, sd {values.std():.4f} ({spec})")
    return table if table is not None else pd.read_parquet(out)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # missing, or parts of another column still wait there
        pass


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
