"""Load and validate preference datasets into one normalized table.

Accepted schemas (JSONL, optionally gzipped, CSV or Parquet; see `dualign.runio.read_table`):

- PKU-SafeRLHF: `prompt`, `response_0`, `response_1`, `better_response_id`,
  `safer_response_id`, `is_response_0_safe`, `is_response_1_safe` (the safety columns may be
  absent for a helpfulness-only set);
- TRL: `prompt`, `chosen`, `rejected` (strings, or conversations as lists of
  `{"role", "content"}` messages);
- HH-RLHF: `chosen`, `rejected` full transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...")
  without a prompt column; the prompt is everything before the last "\\n\\nAssistant:".

The normalized table has, per pair: `prompt`, `response_0`, `response_1` (str),
`better_response_id`, `safer_response_id` (int 0/1, or -1 when the set has no such label),
`is_response_0_safe`, `is_response_1_safe` (nullable boolean), plus `category` when present.
For TRL and HH-RLHF sets `chosen` becomes response 0 and both ids are 0: whichever quality
the chosen answer was preferred for (helpfulness or harmlessness) is what a model trained on
that set learns. `df.attrs["schema"]` says which schema was read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..runio import read_table

PKU_COLUMNS = ("prompt", "response_0", "response_1", "better_response_id")
SAFETY_COLUMNS = ("safer_response_id", "is_response_0_safe", "is_response_1_safe")
NORMALIZED = ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
              "is_response_0_safe", "is_response_1_safe")
HH_ASSISTANT = "\n\nAssistant:"


def detect_schema(columns, file: str | None = None) -> str:
    """"pku", "trl" or "hh" from a table's column names (`file`: the table's path, for messages).

    Raises
    ------
    InputError
        The columns fit none of the schemas (naming `file`).
    """
    cols = set(columns)
    if set(PKU_COLUMNS) <= cols:
        return "pku"
    if {"prompt", "chosen", "rejected"} <= cols:
        return "trl"
    if {"chosen", "rejected"} <= cols:
        return "hh"
    raise InputError("unknown preference schema: expected PKU-SafeRLHF columns "
                     f"({', '.join(PKU_COLUMNS)}, ...), TRL prompt/chosen/rejected, or HH-RLHF "
                     f"chosen/rejected transcripts; got {', '.join(map(str, columns))}", file=file)


def load_preferences(path, *, schema: str | None = None, require_safety: bool = False,
                     limit: int | None = None) -> pd.DataFrame:
    """Read a preference file and return the normalized table.

    Parameters
    ----------
    path : path-like
        `.jsonl`, `.jsonl.gz`, `.json`, `.csv` or `.parquet`.
    schema : {"pku", "trl", "hh"}, optional
        Default: detected from the columns.
    require_safety : bool
        Demand `safer_response_id` (a PKU file without it raises).
    limit : int, optional
        Keep only the first `limit` records (>= 1; only those records are validated).

    Returns
    -------
    pandas.DataFrame
        Columns `NORMALIZED` (+ `category` if present), one row per pair, index 0..n-1.

    Raises
    ------
    InputError
        Unreadable file, unknown schema (naming the file), `limit` < 1, or a bad record:
        names the file, the record number (1-based: the first record is record 1, as in
        score-table messages) and the field, e.g. `better_response_id` not in {0, 1}, a
        missing prompt, a response that is not a string, an HH transcript without an
        "Assistant:" turn.
    """
    path = Path(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise InputError(f"limit must be an integer >= 1, got {limit!r}", file=str(path), field="limit")
    df = read_table(path)
    schema = schema or detect_schema(df.columns, str(path))
    if limit is not None:
        df = df.iloc[:limit]
    if schema == "pku":
        out = _from_pku(df, str(path), require_safety)
    elif schema == "trl":
        out = _from_trl(df, str(path))
    elif schema == "hh":
        out = _from_hh(df, str(path))
    else:
        raise InputError(f"unknown schema {schema!r} (use pku, trl or hh)", file=str(path))
    if require_safety and (out["safer_response_id"] < 0).any():
        raise InputError("this set has no safety labels (safer_response_id), which a cost model needs",
                         file=str(path), field="safer_response_id")
    out.attrs["schema"] = schema
    out.attrs["source"] = str(path)
    return out


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA


def _text(v, file, rec, field, allow_empty=False) -> str:
    if _missing(v):
        raise InputError("missing value", file=file, record=rec, field=field)
    if not isinstance(v, str):
        raise InputError(f"expected a string, got {type(v).__name__}", file=file, record=rec, field=field)
    if not allow_empty and not v.strip():
        raise InputError("empty string", file=file, record=rec, field=field)
    return v


def _binary_id(v, file, rec, field) -> int:
    if _missing(v):
        raise InputError("missing value", file=file, record=rec, field=field)
    # v == 0 / v == 1 rather than float(v): an integer too large for a float must not raise OverflowError
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, float, np.floating)) \
            or not (v == 0 or v == 1):
        raise InputError(f"must be 0 or 1, got {v!r}", file=file, record=rec, field=field)
    return int(v)


def _flag(v, file, rec, field):
    if _missing(v):
        raise InputError("missing value", file=file, record=rec, field=field)
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise InputError(f"must be true or false, got {v!r}", file=file, record=rec, field=field)


def _from_pku(df: pd.DataFrame, file: str, require_safety: bool) -> pd.DataFrame:
    has_safety = all(c in df.columns for c in SAFETY_COLUMNS)
    partial = [c for c in SAFETY_COLUMNS if c in df.columns]
    if partial and not has_safety:
        missing = [c for c in SAFETY_COLUMNS if c not in df.columns]
        raise InputError("safety labels are incomplete", file=file, field=missing[0])
    if require_safety and not has_safety:
        raise InputError("missing column (a cost model needs safety labels)", file=file,
                         field="safer_response_id")
    rows = []
    cols = {c: df[c].tolist() for c in df.columns}
    for i in range(len(df)):
        rec = i + 1
        row = {"prompt": _text(cols["prompt"][i], file, rec, "prompt"),
               "response_0": _text(cols["response_0"][i], file, rec, "response_0", allow_empty=True),
               "response_1": _text(cols["response_1"][i], file, rec, "response_1", allow_empty=True),
               "better_response_id": _binary_id(cols["better_response_id"][i], file, rec, "better_response_id")}
        if has_safety:
            row["safer_response_id"] = _binary_id(cols["safer_response_id"][i], file, rec, "safer_response_id")
            row["is_response_0_safe"] = _flag(cols["is_response_0_safe"][i], file, rec, "is_response_0_safe")
            row["is_response_1_safe"] = _flag(cols["is_response_1_safe"][i], file, rec, "is_response_1_safe")
        else:
            row.update(safer_response_id=-1, is_response_0_safe=pd.NA, is_response_1_safe=pd.NA)
        if "category" in cols and isinstance(cols["category"][i], str):
            row["category"] = cols["category"][i]
        rows.append(row)
    return _frame(rows)


def _message_text(v, file, rec, field, role: str) -> str:
    """A string, or the content of the last `role` message of a conversation."""
    if isinstance(v, np.ndarray):  # parquet gives arrays for list columns
        v = v.tolist()
    if isinstance(v, list):
        msgs = [m for m in v if isinstance(m, dict) and m.get("role") == role]
        if not msgs:
            raise InputError(f"conversation has no '{role}' message", file=file, record=rec, field=field)
        return _text(msgs[-1].get("content"), file, rec, field)
    return _text(v, file, rec, field, allow_empty=(field != "prompt"))


def _from_trl(df: pd.DataFrame, file: str) -> pd.DataFrame:
    rows = []
    p, c, r = df["prompt"].tolist(), df["chosen"].tolist(), df["rejected"].tolist()
    cat = df["category"].tolist() if "category" in df.columns else None
    for i in range(len(df)):
        rec = i + 1
        row = {"prompt": _message_text(p[i], file, rec, "prompt", "user"),
               "response_0": _message_text(c[i], file, rec, "chosen", "assistant"),
               "response_1": _message_text(r[i], file, rec, "rejected", "assistant"),
               "better_response_id": 0, "safer_response_id": 0,
               "is_response_0_safe": pd.NA, "is_response_1_safe": pd.NA}
        if cat is not None and isinstance(cat[i], str):
            row["category"] = cat[i]
        rows.append(row)
    return _frame(rows)


def split_transcript(text: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into (prompt, final response).

    The prompt is everything before the last "\\n\\nAssistant:" (the whole dialogue so far,
    leading newlines stripped); the response is what follows it, stripped.

    Raises
    ------
    ValueError
        The transcript has no "\\n\\nAssistant:" turn.
    """
    k = text.rfind(HH_ASSISTANT)
    if k < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    return text[:k].lstrip("\n"), text[k + len(HH_ASSISTANT):].strip()


def _from_hh(df: pd.DataFrame, file: str) -> pd.DataFrame:
    rows = []
    ch, rj = df["chosen"].tolist(), df["rejected"].tolist()
    for i in range(len(df)):
        rec = i + 1
        parts = []
        for field, v in (("chosen", ch[i]), ("rejected", rj[i])):
            t = _text(v, file, rec, field)
            try:
                parts.append(split_transcript(t))
            except ValueError as e:
                raise InputError(str(e), file=file, record=rec, field=field) from None
        (p0, r0), (p1, r1) = parts
        # The two transcripts share the dialogue up to the last turn; where crowdworkers'
        # branches diverge earlier, the chosen side's context is kept.
        rows.append({"prompt": p0, "response_0": r0, "response_1": r1,
                     "better_response_id": 0, "safer_response_id": 0,
                     "is_response_0_safe": pd.NA, "is_response_1_safe": pd.NA,
                     "same_context": p0 == p1})
    return _frame(rows)


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in ("better_response_id", "safer_response_id"):
        df[c] = df[c].astype("int64")
    for c in ("is_response_0_safe", "is_response_1_safe"):
        df[c] = df[c].astype("boolean")
    return df.reset_index(drop=True)


def chosen_rejected(df: pd.DataFrame, label: str = "better") -> tuple[list[str], list[str], list[str]]:
    """(prompts, preferred responses, other responses) by `better_response_id` or
    `safer_response_id` (label "better" or "safer")."""
    ids = df[f"{label}_response_id"].to_numpy()
    r0, r1 = df["response_0"].tolist(), df["response_1"].tolist()
    pref = [a if k == 0 else b for a, b, k in zip(r0, r1, ids)]
    other = [b if k == 0 else a for a, b, k in zip(r0, r1, ids)]
    return df["prompt"].tolist(), pref, other
