"""Checkpoint weights: one reader for a checkpoint directory's weights (safetensors, or the PyTorch
`.bin` pickles many published models still use, read only through torch's restricted unpickler)
and `convert_checkpoint` (`dualign convert`), which rewrites them as safetensors once.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

# One reader for the weights of a checkpoint directory, used by the safe-rlhf scorer and by
# `convert_checkpoint`. safetensors first; else PyTorch `.bin` pickles, read only through torch's
# restricted unpickler (`weights_only=True`: tensors and plain containers, never code).

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
REFUSAL = "needs full unpickling, which dualign refuses: convert it with a tool you trust"
# the non-weight files of a checkpoint that `convert_checkpoint` copies: configs, tokenizers,
# chat templates, model cards; never code (`*.py`) nor other pickles (`training_args.bin`)
_COPY_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".md", ".tiktoken")
_COPY_PREFIXES = ("LICENSE", "NOTICE", "README")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint directory, as `weight_files` found them.

    Attributes
    ----------
    format : {"safetensors", "bin"}
    files : tuple of pathlib.Path
        Every file to read, in order (shards sorted by name).
    index : pathlib.Path or None
        The shard index (`model.safetensors.index.json` / `pytorch_model.bin.index.json`).
    weight_map : dict or None
        The index's tensor name -> shard file name.
    """

    format: str
    files: tuple
    index: Path | None = None
    weight_map: dict | None = None


def weight_files(directory) -> WeightFiles:
    """Find a checkpoint's weight files without reading them: `model.safetensors.index.json`,
    else `model.safetensors`, else any `*.safetensors`, else `pytorch_model.bin.index.json`, else
    `pytorch_model.bin`.

    Raises
    ------
    InputError
        No weights; `.bin` shards without their index; an index that is not JSON, has no
        `weight_map`, or names a shard that is missing or not a plain file name in the
        directory (the message names the index and the shard).
    """
    d = Path(directory)
    if (d / SAFE_INDEX).is_file():
        return _indexed(d / SAFE_INDEX, "safetensors")
    if (d / SAFE_WEIGHTS).is_file():
        return WeightFiles("safetensors", (d / SAFE_WEIGHTS,))
    other = sorted(p for p in d.glob("*.safetensors") if p.is_file())
    if other:
        return WeightFiles("safetensors", tuple(other))
    if (d / BIN_INDEX).is_file():
        return _indexed(d / BIN_INDEX, "bin")
    if (d / BIN_WEIGHTS).is_file():
        return WeightFiles("bin", (d / BIN_WEIGHTS,))
    shards = sorted(p.name for p in d.glob("pytorch_model*.bin"))
    if shards:
        raise InputError(f"{shards[0]} is a shard but {BIN_INDEX} is missing", file=str(d))
    raise InputError(f"no weights: none of {SAFE_INDEX}, {SAFE_WEIGHTS}, *.safetensors, {BIN_INDEX}, "
                     f"{BIN_WEIGHTS}", file=str(d))


def _indexed(index: Path, fmt: str) -> WeightFiles:
    import json

    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        raise InputError(f"not a JSON shard index ({e})", file=str(index)) from None
    wm = raw.get("weight_map") if isinstance(raw, dict) else None
    if not (isinstance(wm, dict) and wm and all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items())):
        raise InputError("no weight_map (a non-empty object: tensor name -> shard file)", file=str(index))
    files = []
    for name in sorted(set(wm.values())):
        # a shard is a file next to the index: a path elsewhere would read files the user never named
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise InputError(f"names shard '{name}', which is not a file name in this directory", file=str(index))
        if not (index.parent / name).is_file():
            raise InputError(f"names shard '{name}', which does not exist", file=str(index))
        files.append(index.parent / name)
    return WeightFiles(fmt, tuple(files), index, dict(wm))


def _unpickling_reason(e: Exception) -> str:
    """What torch's weights_only error says it refused: "it references GLOBAL mod.name" for a
    pickled class or function, else the unpickler's own line (an opcode...). torch's advice to
    allowlist the global is left out: dualign never does that."""
    import re

    text = str(e)
    m = re.search(r"GLOBAL\s+([\w.<>]+)", text)
    if m:
        return f"it references {m.group(1).rstrip('.')}, not a tensor"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported" in ln or "WeightsUnpickler error" in ln:
            return ln.replace("WeightsUnpickler error: ", "").strip() or "unsupported content"
    return lines[-1] if lines else type(e).__name__


def _refusal(e: Exception) -> str:
    """The one-line message for a file torch's weights_only unpickler refused: one that pickles
    an object (a GLOBAL: a class, a function) needs full unpickling; anything else may be corrupt."""
    reason = _unpickling_reason(e)
    if reason.startswith("it references"):
        return f"{REFUSAL} ({reason})"
    return f"the restricted unpickler cannot read it ({reason}): it is corrupt, or it {REFUSAL}"


def _check_torch_load_is_safe(path: Path) -> None:
    import torch
    from packaging.version import Version

    # before 2.6, weights_only=True could be bypassed to run code (CVE-2025-32434)
    if Version(torch.__version__.split("+")[0]) < Version("2.6"):
        raise InputError(f"reading .bin weights needs torch >= 2.6 (torch {torch.__version__}'s restricted "
                         f"unpickler can be bypassed, CVE-2025-32434); upgrade torch, or convert the "
                         f"checkpoint with a tool you trust", file=str(path))


def read_weights_file(path) -> dict:
    """One weight file as a dict of CPU tensors: safetensors by `safe_open`, anything else by
    `torch.load(path, map_location="cpu", weights_only=True)` (memory-mapped when the file is in
    torch's zip format), as transformers reads `.bin` files.

    The restricted unpickler builds tensors, dicts, lists, tuples and plain values only; a file
    that pickles anything else (a class instance, a function reference) is refused before any
    of it is built, so no code in it runs.

    Returns
    -------
    dict[str, torch.Tensor]

    Raises
    ------
    InputError
        One line naming the file: it needs full unpickling ("needs full unpickling, which
        dualign refuses: convert it with a tool you trust", with what it references), it is
        corrupt, it is not a mapping of names to tensors, or torch < 2.6.
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as st:
                return {k: st.get_tensor(k) for k in st.keys()}
        except SafetensorError as e:
            raise InputError(f"not a readable safetensors file ({e})", file=str(path)) from None
    _check_torch_load_is_safe(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise InputError(_refusal(e), file=str(path)) from None
    except (OSError, MemoryError):
        raise
    except Exception as e:  # truncated or garbage files fail in many ways (EOFError, RuntimeError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else "empty or truncated"
        raise InputError(f"not a readable PyTorch checkpoint ({type(e).__name__}: {first})",
                         file=str(path)) from None
    if not isinstance(obj, dict):
        raise InputError(f"not a state dict: it holds a {type(obj).__name__}, not a mapping of names "
                         f"to tensors", file=str(path))
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise InputError(f"not a state dict: entry {k!r} is a {type(v).__name__}, not a tensor",
                             file=str(path))
    return dict(obj)


def iter_state_dict(directory, files: WeightFiles | None = None):
    """Read a checkpoint's weights one file (shard) at a time, checked against its index.

    Parameters
    ----------
    directory : path of the checkpoint directory
    files : WeightFiles, optional
        What `weight_files(directory)` returns (found again when not given).

    Yields
    ------
    (pathlib.Path, dict[str, torch.Tensor])
        Each weight file and its tensors.

    Raises
    ------
    InputError
        As `weight_files` and `read_weights_file`; a shard holding a tensor its index maps
        elsewhere (or nowhere), a tensor in two files, or an index entry no shard holds (each
        names the file).
    """
    wf = files if files is not None else weight_files(directory)
    seen: set = set()
    for f in wf.files:
        sd = read_weights_file(f)
        if wf.weight_map is not None:
            stray = [k for k in sd if wf.weight_map.get(k) != f.name]
            if stray:
                where = wf.weight_map.get(stray[0])
                raise InputError(f"{f.name} holds '{stray[0]}', which the index "
                                 f"{'maps to ' + where if where else 'does not list'}", file=str(wf.index))
        twice = seen.intersection(sd)
        if twice:
            raise InputError(f"tensor '{min(twice)}' is in two weight files (again in {f.name})",
                             file=str(Path(directory)))
        seen.update(sd)
        yield f, sd
    if wf.weight_map is not None:
        lost = [k for k in wf.weight_map if k not in seen]
        if lost:
            raise InputError(f"maps '{lost[0]}' to {wf.weight_map[lost[0]]}, which does not hold it "
                             f"({len(lost)} such tensors)", file=str(wf.index))


def read_state_dict(directory) -> dict:
    """All the weights of a checkpoint directory, as transformers would find them.

    safetensors first (`model.safetensors.index.json` with its shards, `model.safetensors`, or
    any `*.safetensors`); else PyTorch pickles (`pytorch_model.bin.index.json` with its shards,
    or `pytorch_model.bin`), read only through torch's restricted unpickler (see
    `read_weights_file`). An index must name existing shards in the directory and list exactly
    the tensors they hold.

    Returns
    -------
    dict[str, torch.Tensor]
        On the CPU, in the files' dtypes.

    Raises
    ------
    InputError
        One line naming the directory, index or weight file at fault (see `weight_files`,
        `read_weights_file`, `iter_state_dict`).
    """
    sd: dict = {}
    for _, part in iter_state_dict(directory):
        sd.update(part)
    return sd


def parse_size(size) -> int:
    """A byte count from an int or a string such as "5GB" (10**9), "500MB", "2GiB" (2**30).

    Raises
    ------
    InputError
        Not a positive size.
    """
    import re

    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if m is None:
            raise InputError(f"not a size: {size!r} (use e.g. 5GB, 500MB, 2GiB or a byte count)",
                             field="max_shard_size")
        n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise InputError(f"a size must be positive, got {size!r}", field="max_shard_size")
    return n


def _unshared(tensors: dict) -> tuple[dict, list]:
    """Tensors safetensors can write: contiguous, and no two sharing storage (safetensors refuses
    shared storage, which `.bin` files keep for tied weights): later sharers are cloned.

    Returns
    -------
    (dict[str, torch.Tensor], list of the names cloned)
    """
    out, seen, cloned = {}, set(), []
    for k, t in tensors.items():
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()  # a copy, with storage of its own
        elif t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                cloned.append(k)
            else:
                seen.add(ptr)
        out[k] = t
    return out, cloned


def convert_checkpoint(src, dst, max_shard_size="5GB", progress: bool = True) -> dict:
    """Copy a checkpoint directory with its weights rewritten as safetensors.

    The weights are read with `iter_state_dict` (a `.bin` only through torch's restricted
    unpickler), one source shard at a time, and written as `model.safetensors`, or as
    `model-00001-of-0000N.safetensors` shards of at most `max_shard_size` (a tensor larger than
    that gets a shard of its own) with a `model.safetensors.index.json`, as transformers names
    them. Tensors sharing storage (tied weights) are cloned. Configs, tokenizer files, chat
    templates and model cards (`*.json`, `*.txt`, `*.model`, `*.jinja`, `*.md`, `*.tiktoken`,
    LICENSE/NOTICE/README) are copied; anything else (code, other pickles, subdirectories) is
    not. The directory is built next to `dst` under a temporary name and renamed onto `dst` at
    the end: a failed or killed conversion leaves no `dst` (a failure removes the temporary
    directory; a SIGKILL leaves it behind as `.NAME.*.partial`).

    Parameters
    ----------
    src : path of the checkpoint directory (with a config.json)
    dst : path of the new directory; must not exist, or be empty
    max_shard_size : int or str
        Bytes, or a size such as "5GB" (10**9 bytes), "2GiB" (2**30 bytes). Default "5GB".
    progress : bool
        Show a tqdm bar over the source's weight files.

    Returns
    -------
    dict
        `out` (Path), `format` (of the source: "bin" or "safetensors"), `sources` (weight file
        names read), `weights` (files written; with `index` the index's name, else None),
        `tensors` (count), `bytes` (total tensor bytes), `cloned` (tensor names un-shared),
        `copied` and `skipped` (other file names).

    Raises
    ------
    InputError
        `src` is not a checkpoint directory, its weights are unreadable or refused (see
        `read_state_dict`), or the size is bad.
    OutputError
        `dst` exists and is not an empty directory, or cannot be written.
    """
    import json

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..runio import OutputError, _umask, check_output_dir

    src, dst = Path(src), Path(dst)
    limit = parse_size(max_shard_size)
    if not src.is_dir():
        raise InputError("no such checkpoint directory", file=str(src))
    if not (src / "config.json").is_file():
        raise InputError("not a checkpoint directory: no config.json", file=str(src))
    if dst.is_symlink():
        raise OutputError("is a symlink: give a new directory", file=str(dst))
    if dst.exists():
        if not dst.is_dir():
            raise OutputError("exists and is not a directory", file=str(dst))
        if any(dst.iterdir()):
            raise OutputError("exists and is not empty: give a new directory", file=str(dst))
    check_output_dir(dst)
    wf = weight_files(src)  # a bad index fails here, before anything is written

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        skip = {f.name for f in wf.files} | {SAFE_INDEX, BIN_INDEX}
        copied, skipped = [], []
        for p in sorted(src.iterdir()):
            if p.name in skip:
                continue
            if p.is_file() and (p.suffix in _COPY_SUFFIXES or p.name.upper().startswith(_COPY_PREFIXES)):
                shutil.copyfile(p, tmp / p.name)  # follows symlinks: HF cache snapshots are links
                copied.append(p.name)
            else:
                skipped.append(p.name + ("/" if p.is_dir() else ""))

        parts, cloned = [], []  # (temporary file name, tensor names) per output shard
        buf, buf_bytes, total, n_tensors = {}, 0, 0, 0

        def flush():
            tensors, shared = _unshared(buf)
            name = f"part-{len(parts) + 1:05d}.partial"
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            # safetensors writes owner-only files; give them a plain open()'s mode
            os.chmod(tmp / name, 0o666 & ~_umask())
            parts.append((name, list(tensors)))
            cloned.extend(shared)

        bar = tqdm(iter_state_dict(src, wf), total=len(wf.files), desc="convert", unit="file",
                   disable=not progress)
        try:
            for _, sd in bar:
                for k, t in sd.items():
                    size = t.numel() * t.element_size()
                    if buf and buf_bytes + size > limit:
                        flush()
                        buf, buf_bytes = {}, 0
                    buf[k] = t
                    buf_bytes += size
                    total += size
                    n_tensors += 1
                del sd
        finally:
            bar.close()
        if buf:
            flush()
            buf = {}
        if not parts:
            raise InputError("the weight files hold no tensors", file=str(src))

        if len(parts) == 1:
            os.replace(tmp / parts[0][0], tmp / SAFE_WEIGHTS)
            written, index = [SAFE_WEIGHTS], None
        else:
            written, weight_map = [], {}
            for i, (name, keys) in enumerate(parts, 1):
                final = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                os.replace(tmp / name, tmp / final)
                written.append(final)
                weight_map.update({k: final for k in keys})
            index = SAFE_INDEX
            (tmp / index).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        # mkdtemp makes an owner-only directory; the result gets what a plain mkdir would
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, dst)  # onto a missing or empty dst
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": dst, "format": wf.format, "sources": [f.name for f in wf.files], "weights": written,
            "index": index, "tensors": n_tensors, "bytes": total, "cloned": cloned,
            "copied": copied, "skipped": skipped}
