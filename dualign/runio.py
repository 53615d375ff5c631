"""Run-directory I/O: atomic writes, content digests and reading user tables with clear errors."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError

TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json", ".jsonl.gz")


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file, and a killed writer leaves only a `.tmp` file
    that the next run overwrites.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj, path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_text(text: str, path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def file_digest(path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex, first 16 characters: enough to tell inputs apart)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()[:16]


def array_digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def read_table(path, *, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a Parquet, CSV or JSON Lines (optionally gzipped) file into a DataFrame.

    Raises
    ------
    InputError
        The file is missing, empty, of an unknown type, does not parse (naming the line for
        JSONL), or lacks one of the `required` columns.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("no such file", file=str(p))
    name = p.name.lower()
    try:
        if name.endswith(".parquet"):
            df = pd.read_parquet(p)
        elif name.endswith(".csv"):
            df = pd.read_csv(p)
        elif name.endswith((".jsonl", ".jsonl.gz", ".json")):
            df = pd.DataFrame(read_jsonl(p))
        else:
            raise InputError(f"unknown table type (expected one of {', '.join(TABLE_SUFFIXES)})",
                             file=str(p))
    except InputError:
        raise
    except Exception as e:  # parser errors from pandas/pyarrow: one line, naming the file
        raise InputError(f"cannot read table: {str(e).splitlines()[0]}", file=str(p)) from None
    if len(df) == 0:
        raise InputError("the table is empty", file=str(p))
    for col in required:
        if col not in df.columns:
            raise InputError(f"missing column (columns are: {', '.join(map(str, df.columns))})",
                             file=str(p), field=col)
    return df


def read_jsonl(path) -> list[dict]:
    """Records of a JSON Lines file (`.gz` allowed); a bad line raises InputError naming it."""
    import gzip

    p = Path(path)
    opener = gzip.open if p.name.endswith(".gz") else open
    records = []
    with opener(p, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"invalid JSON ({e.msg})", file=str(p), record=f"line {i}") from None
            if not isinstance(rec, dict):
                raise InputError("expected a JSON object", file=str(p), record=f"line {i}")
            records.append(rec)
    return records


def new_run_dir(out=None, prefix: str = "run") -> Path:
    """`out` if given (created if needed), else a fresh `runs/<prefix>-<timestamp>` folder."""
    import time

    if out is not None:
        path = Path(out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"{prefix}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path("runs") / f"{prefix}-{stamp}-{n}"
    path.mkdir(parents=True, exist_ok=True)
    return path
