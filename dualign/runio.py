"""Run-directory I/O: atomic writes, content digests and reading user tables with clear errors.

One module, though over 500 lines: it is everything a run does to files (checked, atomic
writes; the one digest scheme; user tables read with one-line errors; run folders, names and
their locks), under one error convention (OutputError / InputError naming the file);
`dist_info` is here for `run_lock`, which rank 0 alone takes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from .errors import InputError, OutputError

TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json", ".jsonl.gz")


def _umask() -> int:
    """The process umask. Read from /proc where it can be (Linux): `os.umask` reads it only by
    setting it, and another thread creating a file in between would get the wrong mode."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _output_error(path, e: OSError) -> OutputError:
    if isinstance(e, NotADirectoryError):
        return OutputError("cannot write: a parent of this path is a file, not a directory", file=str(path))
    return OutputError(f"cannot write: {e.strerror or e}", file=str(path))


def _check_parent(directory: Path, target: Path) -> None:
    """The nearest existing ancestor of `directory` (itself included) must be a writable directory."""
    for d in (directory, *directory.parents):
        try:
            st = os.stat(d)  # a symlink to a directory is a fine parent
        except FileNotFoundError:
            continue
        except OSError as e:
            raise _output_error(target, e) from None
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"cannot write: {d} is not a directory", file=str(target))
        if not os.access(d, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write: directory {d} is not writable", file=str(target))
        return


def check_output_file(path) -> Path:
    """Check, before anything is written, that `path` can be written as a regular file.

    Returns
    -------
    pathlib.Path
        `path`.

    Raises
    ------
    OutputError
        `path` exists and is not a regular file (a symlink, even to a regular file, a directory,
        FIFO, socket or device: the atomic rename would replace it), or its nearest existing
        ancestor is a file or a directory this process cannot write.
    """
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _output_error(p, e) from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"refusing to replace a {_kind(st.st_mode)}: an output must be a regular file",
                          file=str(p))
    _check_parent(p.parent, p)
    return p


def check_output_dir(path) -> Path:
    """Check, before anything is written, that `path` is (or can be created as) a writable directory.

    Raises
    ------
    OutputError
        `path` exists and is not a directory, or is a directory this process cannot write, or
        its nearest existing ancestor is a file or not writable.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError("exists and is not a directory", file=str(p))
    _check_parent(p, p)
    return p


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file, and a killed writer leaves only a `.tmp` file.
    The file gets the mode a plain `open(path, "w")` gives a new file: 0o666 minus the umask
    (`mkstemp` alone would make it owner-only).

    Raises
    ------
    OutputError
        `check_output_file` fails (checked before the block runs, and again just before the
        rename), or creating, writing (an OSError inside the block, e.g. a full disk) or
        renaming fails; `path` is then left as it was.
    """
    path = check_output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        raise _output_error(path, e) from None
    try:
        try:
            yield Path(tmp)
            check_output_file(path)  # something may have appeared there while the block ran
            os.replace(tmp, path)
        except OSError as e:
            raise _output_error(path, e) from None
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


# ----------------------------------------------------------------------------- digests
# One scheme for every key a cache, a run record or a provenance holds: sha256 over a stream of
# parts, hex, cut to a length. A part is bytes (as is) or an array (its dtype and shape, then its
# bytes, so equal bytes of another dtype or shape differ). The helpers below are the ways an
# object becomes such a stream; none hashes any other way.

def stream_digest(parts, length: int = 16) -> str:
    """sha256 hex digest (first `length` digits) of a stream of parts, read one at a time.

    Parameters
    ----------
    parts : iterable of bytes or array_like
        bytes (bytearray, memoryview) go in as they are; anything else as a numpy array:
        its dtype and shape, then its bytes in C order. A generator is consumed lazily, so a
        caller can stream a large file or a model's weights without holding them all.
    length : int
        Hex digits kept (64: the whole digest).
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (bytes, bytearray, memoryview)):
            h.update(part)
        else:
            a = np.ascontiguousarray(part)
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()[:length]


def digest(obj, length: int = 16) -> str:
    """Digest of a JSON-serializable object (keys sorted, other objects by `str`): the one
    digest of settings, keys and texts every cache uses."""
    return stream_digest([json.dumps(obj, sort_keys=True, default=str).encode()], length)


def file_digest(path, chunk: int = 1 << 20, length: int = 16) -> str:
    """Digest of a file's bytes (enough, at 16 hex digits, to tell inputs apart)."""
    def chunks():
        with open(path, "rb") as f:
            while b := f.read(chunk):
                yield b

    return stream_digest(chunks(), length)


def array_digest(*arrays, length: int = 16) -> str:
    """Digest of arrays (anything `numpy.asarray` takes): each one's dtype, shape and bytes, in order."""
    return stream_digest((np.asarray(a) for a in arrays), length)


# ----------------------------------------------------------------------------- user tables

def read_table(path, *, required: tuple[str, ...] = (), text_columns: tuple[str, ...] = (),
               columns=None) -> pd.DataFrame:
    """Read a Parquet, CSV or JSON Lines (optionally gzipped) file into a DataFrame.

    Parameters
    ----------
    path : path-like
    required : tuple of str
        Columns that must be present.
    text_columns : tuple of str
        CSV columns read as the text written in the file (ids): no value, not even an empty
        field or "NA", "null", "NaN", is taken as missing; a column whose every value is a
        canonical integer ("12", "-3"; not "007" or "+1") becomes int64, as pandas reads it,
        so ids 7 and "007" stay apart. Parquet and JSONL keep the types the file gives.
    columns : callable, optional
        Given the file's column names (a list, read from the Parquet schema or the CSV
        header before any data), returns the names of the columns to read; it may raise
        (e.g. InputError for a missing column, naming the others). Only those are read:
        Parquet by column projection, CSV with `usecols`, so other columns (response text)
        never reach memory; JSON Lines is parsed whole, then cut down. Default: all.

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

    def pick(names, n_rows):
        """The columns to read; with `columns`, the checks below run before any data is read."""
        if columns is None:
            return None
        if n_rows == 0:
            raise InputError("the table is empty", file=str(p))
        for col in required:
            if col not in names:
                raise InputError(f"missing column (columns are: {', '.join(map(str, names))})",
                                 file=str(p), field=col)
        return list(columns(list(names)))

    try:
        if name.endswith(".parquet"):
            want = None
            if columns is not None:
                import pyarrow.parquet as pq

                meta = pq.ParquetFile(p).metadata
                schema = meta.schema.to_arrow_schema()
                # pandas' index columns come back as the index, not as columns
                index = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
                want = pick([c for c in schema.names if c not in index], meta.num_rows)
            df = pd.read_parquet(p, columns=want)
        elif name.endswith(".csv"):
            want = None
            if columns is not None:
                head = pd.read_csv(p, nrows=1)
                want = pick(list(head.columns), len(head))
            df = pd.read_csv(p, usecols=want)
            for col in text_columns:
                if col in df.columns:
                    df[col] = _csv_text_column(p, col, len(df))
        elif name.endswith((".jsonl", ".jsonl.gz", ".json")):
            df = pd.DataFrame(read_jsonl(p))
            if columns is not None:
                df = df[pick(list(df.columns), len(df))]
        else:
            raise InputError(f"unknown table type (expected one of {', '.join(TABLE_SUFFIXES)})",
                             file=str(p))
    except InputError:
        raise
    except Exception as e:  # parser errors from pandas/pyarrow: one line, naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot read table: {first}", file=str(p)) from None
    if len(df) == 0:
        raise InputError("the table is empty", file=str(p))
    for col in required:
        if col not in df.columns:
            raise InputError(f"missing column (columns are: {', '.join(map(str, df.columns))})",
                             file=str(p), field=col)
    return df


def _csv_text_column(path: Path, col: str, n_rows: int) -> pd.Series:
    """Column `col` of a CSV file as written (see `read_table`'s `text_columns`), read apart:
    pandas' missing-value markers can only be turned off for all columns of one read."""
    s = pd.read_csv(path, usecols=[col], dtype=str, keep_default_na=False)[col]
    if len(s) != n_rows:  # the two reads split rows differently: refuse rather than misalign
        raise InputError(f"cannot read column consistently ({len(s)} vs {n_rows} rows)", file=str(path), field=col)
    if len(s) and s.map(_is_canonical_int).all():
        return s.astype(np.int64)
    return s


def _is_canonical_int(text: str) -> bool:
    """'12' or '-3', within int64; not '007', '+1', ' 1' or '1.0'."""
    try:
        v = int(text)
    except ValueError:
        return False
    return str(v) == text and -(2 ** 63) <= v < 2 ** 63


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
    """`out` if given (created if needed), else a fresh `runs/<prefix>-<timestamp>` folder
    (created by this call alone: two runs started in the same second get two folders).

    Raises
    ------
    OutputError
        The folder cannot be created or written (`check_output_dir`).
    """
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
        check_output_dir(path)
        # claim the fresh name with an exclusive mkdir: two runs started in the same second
        # must not both take it (the second would then be refused by the run lock)
        while True:
            try:
                path.mkdir(parents=True)
                return path
            except FileExistsError:
                check_output_dir(path)  # raises unless a directory of that name appeared meanwhile
                if not path.is_dir():
                    raise OutputError("cannot create the run folder", file=str(path)) from None
                n += 1
                path = Path("runs") / f"{prefix}-{stamp}-{n}"
            except OSError as e:
                raise _output_error(path, e) from None
    check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _output_error(path, e) from None
    return path


# ----------------------------------------------------------------------------- names and run locks

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_name(name, field: str) -> str:
    """Check a user-given name that becomes a file or folder name (a PeCAN constraint, an
    evaluation suite, a log-prob column suffix): one path component of 1 to 64 characters
    from A-Z a-z 0-9 . _ -, not starting with '.' (so never '.', '..' nor a hidden file).

    Returns
    -------
    str
        `name`, unchanged.

    Raises
    ------
    InputError
        Naming `field`: `name` is not a string, is empty or longer than 64 characters, holds
        another character (a '/', a space) or starts with '.'.
    """
    if not isinstance(name, str):
        raise InputError(f"a name must be text, got {name!r}", field=field)
    if not _NAME.fullmatch(name) or name.startswith("."):
        raise InputError(f"{name!r} is not a valid name: use 1-64 characters from A-Z a-z 0-9 . _ - "
                         "(one path component, not starting with '.')", field=field)
    return name


LOCK_FILE = ".dualign.lock"


class DistInfo(NamedTuple):
    """Where this process sits in a distributed launch (torchrun, `accelerate launch`)."""
    rank: int
    world_size: int
    local_rank: int


def dist_info() -> DistInfo:
    """Rank, world size and local rank from the launcher's environment (RANK, WORLD_SIZE,
    LOCAL_RANK); (0, 1, 0) when not launched that way (WORLD_SIZE unset or 1).

    Raises
    ------
    InputError
        One of those variables is not an integer, or RANK / LOCAL_RANK is out of range.
    """
    vals = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        raw = os.environ.get(name, default)
        try:
            vals[name] = int(raw)
        except ValueError:
            raise InputError(f"environment variable {name}={raw!r} is not an integer") from None
    world, rank, local = vals["WORLD_SIZE"], vals["RANK"], vals["LOCAL_RANK"]
    if world <= 1:
        return DistInfo(0, 1, 0)
    if not 0 <= rank < world or local < 0:
        raise InputError(f"RANK={rank}, LOCAL_RANK={local} do not fit WORLD_SIZE={world}")
    return DistInfo(rank, world, local)


def _launch_rank() -> int | None:
    """This process's rank under a distributed launch (torchrun, `accelerate launch` and the
    DeepSpeed launcher set RANK and WORLD_SIZE), else None."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    except ValueError:
        return None
_HELD: dict[str, int] = {}  # directories this process holds locked -> nesting depth


@contextmanager
def run_lock(directory, flag: str = "--out"):
    """Hold an exclusive lock on a run or output directory while the block runs.

    The lock is `fcntl.flock` on `directory/.dualign.lock` (the folder is created if need be),
    taken without waiting: a second dualign run writing into the same folder is refused at
    once instead of mixing its files with the first one's. The kernel drops the lock when the
    holder exits, however it dies, so a killed run never leaves a stale lock (the file stays,
    holding the last holder's pid, and is harmless). Re-entrant within one process: a sweep
    runs MoCAN in its own folder. Under a distributed launch (`accelerate launch`, torchrun:
    WORLD_SIZE > 1) the ranks are one run: rank 0 takes the lock, the others do not.

    Parameters
    ----------
    directory : path-like
    flag : str
        The option that names the folder, for the message.

    Yields
    ------
    pathlib.Path
        `directory`.

    Raises
    ------
    InputError
        Another process holds the lock: "<dir> is in use by another dualign run (pid N); wait
        for it or choose another --out".
    OutputError
        The folder cannot be created or written.
    """
    import fcntl

    d = check_output_dir(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        key = str(d.resolve())
    except OSError as e:
        raise _output_error(d, e) from None
    if key in _HELD or _launch_rank() not in (None, 0):
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield d
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    try:
        fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise _output_error(d / LOCK_FILE, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held by another process (or by this one through another open file)
        try:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        except OSError:
            pid = "unknown"
        os.close(fd)
        raise InputError(f"{d} is in use by another dualign run (pid {pid}); wait for it or choose "
                         f"another {flag}") from None
    except OSError as e:  # a file system without flock (some FUSE mounts): run, but say it is unguarded
        import warnings

        os.close(fd)
        warnings.warn(f"{d}: cannot lock ({e.strerror or e}); nothing stops a second run from writing "
                      "into this folder at the same time", stacklevel=3)
        fd = None
    if fd is None:
        yield d
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:
        pass  # the pid is only for the message; the lock itself holds
    _HELD[key] = 1
    try:
        yield d
    finally:
        del _HELD[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def open_partial_dir(folder, settings: dict) -> None:
    """Keep `folder`, the finished parts of an interrupted run (sampling, scoring), when its
    `settings.json` equals `settings`; otherwise (other settings, unreadable, absent) start it
    afresh with `settings` written in it. A resumed run then reuses only parts made exactly as
    it would make them."""
    folder = Path(folder)
    meta = folder / "settings.json"
    if folder.exists():
        try:
            same = json.loads(meta.read_text()) == settings
        except (OSError, ValueError):
            same = False
        if same:
            return
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_json(settings, meta)

