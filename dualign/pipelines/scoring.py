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
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd

from ..errors import InputError, OutputError
from ..data.scores import column_is_current, read_samples, write_scores
from ..models.scorers import check_safety_sign, load_scorer, parse_named
from ..runio import digest as runio_digest
from ..runio import file_digest, open_partial_dir, write_parquet


class ScoreJob(NamedTuple):
    """One score column to compute: where it goes, which scorer makes it, and what it is."""

    column: str  # "reward", "safety/<name>" (PeCAN's evaluation prefixes "scorer/")
    spec: str  # a scorer spec, `dualign.models.scorers.load_scorer`'s argument
    role: str  # "reward" or "safety"


def safety_columns(jobs) -> list[str]:
    """The columns of the safety jobs among `jobs` (`ScoreJob`s), in order."""
    return [j.column for j in jobs if j.role == "safety"]


def score_jobs(reward: str | None, safety: list[str] | dict | None) -> list[ScoreJob]:
    """The `ScoreJob`s of a reward spec and `NAME=SPEC` safety specs (or a name → spec
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
    jobs = [ScoreJob("reward", reward, "reward")] if reward else []
    for s in safety:
        name, spec = parse_named(s)
        check_safety_sign(spec, name)
        jobs.append(ScoreJob(f"safety/{name}", spec, "safety"))
    if len({j.column for j in jobs}) != len(jobs):
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

    Under a distributed launch (WORLD_SIZE > 1: torchrun, `accelerate launch`) this is a
    collective, called by every rank with the same arguments: rank r scores parts r, r + W, ...
    of the one-process part plan on its own device (`dualign.parallel.rank_device`), rank 0
    merges every part into `out` (the same file, byte for byte, as one process writes) and
    speaks for the run in `log`. A killed launch, rerun the same way (any world size), scores
    only the parts that are missing. Every rank must see the same `out` (one machine, or a
    shared file system).

    Returns
    -------
    pandas.DataFrame
        The scores table as written (on every rank).

    Raises
    ------
    InputError
        Bad samples, scorer specs or launcher variables.
    OutputError
        Under a distributed launch, a part another rank wrote is not visible to rank 0.
    """
    from ..parallel import process_group, rank_device

    samples = read_samples(samples_path)
    out = Path(out)
    digest = file_digest(samples_path)
    prompts = np.array(samples["prompt"].tolist(), dtype=object)
    responses = np.array(samples["response"].tolist(), dtype=object)
    rows_per_part = max(1, int(batch_size)) * max(1, int(part_batches))
    parts = plan_parts(samples, rows_per_part)
    table = None
    with process_group() as group:
        # Every rank past its caller's clean-up (a forced stage deletes the old scores and parts
        # on every rank) before rank 0 looks at the files: a late rank would delete new parts.
        group.barrier()
        say = log if group.rank == 0 else (lambda *a, **k: None)
        run_device = rank_device(device, group)
        for col, spec, role in jobs:
            prov = {"spec": spec, "template": template, "samples": digest}
            folder = partial_dir(out) / runio_digest(col, 12)
            # compared as JSON (a callable spec by its str: never reused across processes);
            # `device` as given, the same on every rank, not the rank's own GPU
            settings = json.loads(json.dumps(
                {"column": col, "role": role, "provenance": prov, "batch_size": batch_size,
                 "rows_per_part": rows_per_part, "n_rows": len(samples), "dtype": dtype, "device": device},
                sort_keys=True, default=str))
            current = False
            if group.rank == 0:
                current = column_is_current(out, col, prov)
                if current:
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    open_partial_dir(folder, settings)
            # every rank takes rank 0's word (a collective, so the partial folder is ready when
            # the others go on): ranks looking at the files each on its own could disagree
            if group.broadcast(current):
                say(f"{out}: {col} is up to date")
                continue
            # Rank r takes parts r, r + W, ... of a plan that does not depend on the world size:
            # each part is scored in the batches one process scores it in (the same numbers),
            # and parts left by a launch of any world size resume in any other.
            mine = range(group.rank, len(parts), group.world_size)
            values = np.zeros(len(samples))
            todo = []
            for i in mine:
                got = _read_part(folder / _part_name(i), parts[i])
                if got is None:
                    todo.append(i)
                else:
                    values[parts[i]] = got
            n_done = sum(group.gather(len(mine) - len(todo)))
            if n_done:
                say(f"{col}: resuming, {n_done} of {len(parts)} parts already scored")
            if todo:
                scorer = load_scorer(spec, batch_size=batch_size, template=template, dtype=dtype,
                                     device=run_device)
                score = scorer.reward if role == "reward" else scorer.safety
                try:
                    for i in todo:
                        rows = parts[i]
                        v = score(prompts[rows].tolist(), responses[rows].tolist())
                        write_parquet(pd.DataFrame({"row": rows, "value": v}), folder / _part_name(i))
                        values[rows] = v
                finally:
                    scorer.close()
            group.barrier()  # every rank's parts are on disk
            if group.rank == 0:
                for i in range(len(parts)):
                    if i % group.world_size:  # another rank's part
                        values[parts[i]] = _merge_part(folder, i, parts[i], group.world_size)
                table = write_scores(out, samples, {col: values}, provenance={col: prov})
                shutil.rmtree(folder, ignore_errors=True)
                _remove_if_empty(partial_dir(out))
                log(f"{col}: mean {values.mean():.4f}, sd {values.std():.4f} ({spec})")
            group.barrier()  # the column is in `out`
    return table if table is not None else pd.read_parquet(out)


def _part_name(i: int) -> str:
    return f"part-{i:06d}.parquet"


def _merge_part(folder: Path, i: int, rows: np.ndarray, world_size: int) -> np.ndarray:
    """Part `i`, written by rank i % world_size, read by rank 0 to merge.

    Raises
    ------
    OutputError
        The part is missing or does not hold `rows` (a rank writing elsewhere: `out` not on a
        file system every rank sees).
    """
    path = folder / _part_name(i)
    got = _read_part(path, rows)
    if got is None:
        raise OutputError(f"the part of rank {i % world_size} is not visible to rank 0: under a "
                          "multi-machine launch the scores must be on a file system every rank sees",
                          file=str(path))
    return got


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
                    force: bool = False, scores_paths: list | None = None, progress: bool = False,
                    log=print) -> None:
    """Add `logp/<name>` for every model to the scores file of each samples file.

    The one way log-prob columns are made (the pipelines and `dualign logprobs`), so a column
    is reused wherever it was made: it is current when the scores file holds it with the same
    provenance (`model.ident`, `template`, `append_eos`, `max_length`, samples digest). Each
    model is loaded at most once, for all the tables that lack its current column. Tokenization
    (`template`, `append_eos`, `max_length`) must be the one the pre-aligned models were
    trained with, since their log-ratios are what DPO fitted. A response the sampler cut at
    `max_new_tokens` never emitted EOS: its EOS is not counted (`samples_append_eos`).

    Parameters
    ----------
    samples_paths : list of path-like
    models : list of LogProbModel
    scores_paths : list of path-like, optional
        The scores file of each samples file (same length); default: scores.parquet next to it.
    progress : bool
        A progress bar per table (rank 0).

    Under a distributed launch this is a collective, called by every rank with the same
    arguments: each rank loads the model (`load` places it) and computes its shard of the
    batches (`dualign.models.logprobs.logprobs`); rank 0 decides which tables need the column,
    writes them and logs.
    """
    from ..models.logprobs import logprobs, samples_append_eos
    from ..parallel import process_group

    paths = [Path(p) for p in samples_paths]
    outs = [p.parent / "scores.parquet" for p in paths] if scores_paths is None else [Path(o) for o in scores_paths]
    if len(outs) != len(paths):
        raise ValueError(f"{len(outs)} scores files for {len(paths)} samples files")
    scores_of = dict(zip(paths, outs))
    digests = {p: file_digest(p) for p in paths}
    with process_group() as group:
        group.barrier()  # every rank past its caller's clean-up before rank 0 reads the tables
        say = log if group.rank == 0 else (lambda *a, **k: None)
        for m in models:
            col = f"logp/{m.name}"
            prov = {p: {"model": m.ident, "template": template, "append_eos": append_eos,
                        "max_length": max_length, "samples": digests[p]} for p in paths}
            todo = None
            if group.rank == 0:
                todo = [p for p in paths if force or not column_is_current(scores_of[p], col, prov[p])]
            # rank 0's word on every rank: logprobs is a collective, all must run the same tables
            todo = group.broadcast(todo)
            for p in paths:
                if p not in todo:
                    say(f"{scores_of[p]}: {col} is up to date")
            if not todo:
                continue
            model, tok = m.load()
            for p in todo:
                samples = read_samples(p)
                lp, _ = logprobs(model, tok, samples["prompt"].tolist(), samples["response"].tolist(),
                                 batch_size=batch_size, template=template,
                                 append_eos=samples_append_eos(samples, append_eos),
                                 max_length=max_length, progress=progress)
                if group.rank == 0:
                    write_scores(scores_of[p], samples, {col: lp}, provenance={col: prov[p]})
                say(f"wrote {scores_of[p]}: {col} for {len(lp)} responses (mean {lp.mean():.2f} nats)")
                group.barrier()  # the column is in the file before any rank reads it
            del model
