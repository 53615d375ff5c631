"""Long-format score tables (one row per prompt × sample) ⇄ the (N, K[, m]) arrays the dual needs,
and scores.parquet itself: reading samples, adding score columns with their provenance, and
whether a column is current."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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


def _score_columns(columns, reward: str, safety, prompt_id: str, source: str) -> list[str]:
    """The safety columns the dual uses (given, else `default_safety_columns`), after checking
    that they, `reward` and `prompt_id` are among `columns`.

    Raises
    ------
    InputError
        No safety column, or a missing column (the message lists `columns`), naming `source`.
    """
    safety = list(safety) if safety else default_safety_columns(columns)
    if not safety:
        raise InputError("no safety column: name one with --safety (columns are: "
                         f"{', '.join(map(str, columns))})", file=source, field="safety")
    for col in [prompt_id, reward, *safety]:
        if col not in columns:
            raise InputError(f"missing column (columns are: {', '.join(map(str, columns))})",
                             file=source, field=col)
    return safety


def scores_to_arrays(df: pd.DataFrame, reward: str = "reward", safety: list[str] | None = None,
                     prompt_id: str = "prompt_id", source: str = "scores") -> ScoreArrays:
    """Pivot a long score table into arrays, rows grouped by prompt and ordered by `sample_id`.

    Prompts are ordered by their id (the order the bootstrap resamples them in). Record
    numbers in messages count the table's rows from 1 (row 1 is the first data row), as the
    preference loader does.

    Raises
    ------
    InputError
        A missing column; a missing, empty or non-scalar prompt id or sample id, or ids mixing
        numbers and text; a non-numeric or non-finite score; a repeated (prompt id,
        sample_id) pair; prompts with different numbers of samples (the dual needs the same
        K for every prompt), or K < 2. Each names `source`, the record and the field.

    Notes
    -----
    Vectorized throughout (no per-row Python): ids are factorized, rows ordered by one
    stable argsort of the id codes (skipped when the table is already in order), repeats
    found as equal neighbours in that order. 3.84 M rows take about a second.
    """
    safety = _score_columns(df.columns, reward, safety, prompt_id, source)
    df = df.reset_index(drop=True)  # positions are record numbers - 1
    scores = {}
    for col in [reward, *safety]:
        values = _numeric(df[col])
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            v = df[col].iloc[bad[0]]
            v = v.item() if isinstance(v, np.generic) else v  # nan, not np.float64(nan)
            raise InputError(f"not a finite number: {v!r}"[:200], file=source, record=int(bad[0]) + 1, field=col)
        scores[col] = values
    keys = [prompt_id] + (["sample_id"] if "sample_id" in df.columns else [])
    for col in keys:
        _check_ids(df[col], source, col)
    # ids → codes in sorted order of the ids, so sorting codes sorts the ids
    pcode, pids = pd.factorize(df[prompt_id], sort=True)
    key = pcode.astype(np.int64)
    if len(keys) == 2:
        scode, sids = pd.factorize(df["sample_id"], sort=True)
        key = key * len(sids) + scode
    order = None if np.all(key[1:] >= key[:-1]) else np.argsort(key, kind="stable")
    sorted_key = key if order is None else key[order]
    if len(keys) == 2:
        same = np.flatnonzero(sorted_key[1:] == sorted_key[:-1])
        if len(same):
            # the first record (in file order) that repeats an earlier one: the stable order
            # puts each pair's earlier record just before it
            pos = same + 1
            rows = pos if order is None else order[pos]
            at = int(np.argmin(rows))
            i = int(rows[at])
            first = int(pos[at] - 1 if order is None else order[pos[at] - 1])
            pid, sid = df[prompt_id].iloc[i], df["sample_id"].iloc[i]
            pid, sid = (v.item() if isinstance(v, np.generic) else v for v in (pid, sid))
            raise InputError(f"({prompt_id}, sample_id) = ({pid!r}, {sid!r}) repeats "
                             f"record {first + 1}: each sample must appear once", file=source,
                             record=i + 1, field=f"{prompt_id}, sample_id")
    counts = np.bincount(pcode, minlength=len(pids))
    if np.any(counts != counts[0]):
        sizes, freq = np.unique(counts, return_counts=True)
        k = int(sizes[np.argmax(freq)])  # the most common count (the smallest of ties)
        j = int(np.flatnonzero(counts != k)[0])
        odd = pids[j]
        odd = odd.item() if isinstance(odd, np.generic) else odd
        raise InputError(f"prompt {odd!r} has {counts[j]} samples but most prompts have {k}; "
                         "the dual needs the same number of samples for every prompt",
                         file=source, field=prompt_id)
    n, k = len(pids), int(counts[0])
    if k < 2:
        raise InputError(f"every prompt has {k} sample; the dual needs at least 2 samples per prompt "
                         "(K >= 2) to tell them apart", file=source, field=prompt_id)

    def arranged(a):
        return a if order is None else a[order]

    R = arranged(scores[reward]).reshape(n, k)
    G = np.stack([arranged(scores[c]) for c in safety], axis=-1).reshape(n, k, len(safety))
    ids = df[prompt_id].to_numpy()
    return ScoreArrays(reward=R, safety=G, safety_names=safety,
                       prompt_ids=ids[::k] if order is None else ids[order[::k]])


def _numeric(col: pd.Series) -> np.ndarray:
    """`col` as float64, NaN where a value is not a number (text, a list, None, ...)."""
    try:
        return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # lists, dicts, huge integers (JSONL) defeat coerce
        out = np.full(len(col), np.nan)
        for i, v in enumerate(col.tolist()):
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
                try:
                    out[i] = float(v)
                except OverflowError:  # an integer beyond float range: not a finite number
                    pass
        return out


def _check_ids(col: pd.Series, source: str, field: str) -> None:
    """Raise InputError (naming the 1-based record) for a missing, empty or non-scalar id, or a
    column mixing numbers and text (which cannot be ordered)."""
    if pd.api.types.is_integer_dtype(col.dtype):
        return
    if pd.api.types.is_float_dtype(col.dtype):
        bad = np.flatnonzero(~np.isfinite(col.to_numpy(np.float64)))
        if len(bad):
            raise InputError("missing or non-finite id", file=source, record=int(bad[0]) + 1, field=field)
        return
    if isinstance(col.dtype, pd.StringDtype):  # CSV ids read as text: vectorized, no per-row loop
        bad = np.flatnonzero((col.isna() | (col.str.strip() == "")).to_numpy(dtype=bool))
        if len(bad):
            raise InputError("missing or empty id", file=source, record=int(bad[0]) + 1, field=field)
        return
    # object columns (Parquet/JSONL text ids): all-text or all-integer ones are checked
    # vectorized; anything else (None, NaN, mixed kinds, lists) walks the rows to name the record
    kind = pd.api.types.infer_dtype(col, skipna=False)
    if kind == "integer":
        return
    if kind == "string":
        bad = np.flatnonzero((col.str.strip() == "").to_numpy(dtype=bool))
        if len(bad):
            raise InputError("empty id", file=source, record=int(bad[0]) + 1, field=field)
        return
    kinds = set()
    for i, v in enumerate(col.tolist()):
        if isinstance(v, str):
            if not v.strip():
                raise InputError("empty id", file=source, record=i + 1, field=field)
            kinds.add("text")
        elif isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            kinds.add("number")
        elif isinstance(v, (float, np.floating)) and not isinstance(v, (bool, np.bool_)):
            if not np.isfinite(v):
                raise InputError("missing or non-finite id", file=source, record=i + 1, field=field)
            kinds.add("number")
        elif v is None or v is pd.NA:
            raise InputError("missing id", file=source, record=i + 1, field=field)
        else:
            raise InputError(f"expected a string or a number, got {type(v).__name__}", file=source,
                             record=i + 1, field=field)
        if len(kinds) > 1:
            raise InputError("ids mix numbers and text, which cannot be ordered; use one kind", file=source,
                             record=i + 1, field=field)


def read_score_arrays(path, reward: str = "reward", safety: list[str] | None = None,
                      prompt_id: str = "prompt_id") -> ScoreArrays:
    """`scores_to_arrays` of a Parquet / CSV / JSONL file. CSV prompt ids are read as written
    (`read_table`'s `text_columns`): "NA", "null" or "NaN" is an id like any other, an empty
    one is an error. Only the columns the dual needs are read (prompt id, sample_id, reward,
    safety): a Parquet file's response text never enters memory."""
    source = str(path)

    def needed(columns):  # what the dual reads: never response text (column projection)
        cols = [prompt_id, reward, *_score_columns(columns, reward, safety, prompt_id, source)]
        cols += ["sample_id"] if "sample_id" in columns else []
        return list(dict.fromkeys(cols))

    return scores_to_arrays(read_table(path, text_columns=(prompt_id,), columns=needed), reward, safety,
                            prompt_id, source=source)


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


# ----------------------------------------------------------------------------- scores.parquet I/O

SCORE_KEYS = ("prompt_id", "sample_id", "prompt", "response")


def write_scores(path, samples: pd.DataFrame, columns: dict[str, np.ndarray],
                 provenance: dict[str, str] | None = None) -> pd.DataFrame:
    """Add score columns to `scores.parquet`, keyed like the samples.

    The result has one row per sample, in the samples' order, with the keys
    (prompt_id, sample_id, prompt, response), every column already in the file (matched on
    prompt_id and sample_id) and the new `columns` (replacing same-named ones). Written
    atomically.

    Parameters
    ----------
    path : path of scores.parquet
    samples : DataFrame with at least SCORE_KEYS
    columns : dict name -> numpy.ndarray, shape (len(samples),)
    provenance : dict name -> str, optional
        Recorded in the file's metadata (`attrs["dualign"]["columns"]`).

    Returns
    -------
    pandas.DataFrame, the table written.
    """
    from ..runio import write_parquet

    path = Path(path)
    out = samples[list(SCORE_KEYS)].reset_index(drop=True).copy()
    meta = {"columns": {}}
    if path.exists():
        old = pd.read_parquet(path)
        meta = old.attrs.get("dualign", meta) or meta
        keep = [c for c in old.columns if c not in SCORE_KEYS and c not in columns]
        if keep:
            out = out.merge(old[["prompt_id", "sample_id"] + keep], on=["prompt_id", "sample_id"],
                            how="left", validate="one_to_one")
    for name, values in columns.items():
        values = np.asarray(values)
        if values.shape != (len(out),):
            raise ValueError(f"column {name}: {values.shape} values for {len(out)} rows")
        out[name] = values
    meta.setdefault("columns", {}).update(provenance or {})
    out.attrs["dualign"] = meta
    write_parquet(out, path)
    return out


def read_samples(path) -> pd.DataFrame:
    """samples.parquet (or any table with the sample keys), checked.

    Raises
    ------
    InputError
        Missing file or column, or duplicate (prompt_id, sample_id) keys.
    """
    from ..runio import read_table

    df = read_table(path, required=SCORE_KEYS)
    dup = df.duplicated(["prompt_id", "sample_id"])
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise InputError("duplicate (prompt_id, sample_id)", file=str(path), record=i)
    df["response"] = df["response"].fillna("")
    return df


def column_is_current(path, name: str, provenance: dict) -> bool:
    """True when `scores.parquet` at `path` already has column `name` computed with exactly
    `provenance` (the spec and the samples' digest): that work can be skipped."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
    except Exception:
        return False
    if name not in schema.names:
        return False
    attrs = json.loads((schema.metadata or {}).get(b"PANDAS_ATTRS", b"{}") or b"{}")
    return (attrs.get("dualign") or {}).get("columns", {}).get(name) == provenance
