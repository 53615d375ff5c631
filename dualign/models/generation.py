"""Sampling K responses per prompt from a policy, batched, reproducible and resumable.

Reproducible: every (prompt_id, sample_id) row draws its tokens from its own uniform stream,
seeded by (seed, prompt_id, sample_id) and consumed by inverse-CDF sampling in our own
decode loop (`generate_batch`). So a row's response depends on the seed and the row only, not on which
other rows share its batch (up to float rounding of the padded forward pass).

Resumable: rows are sorted by prompt length into a fixed list of batches; each finished
batch is written atomically as one Parquet part under `samples.partial/`, and the final
`samples.parquet` is assembled from the parts. A killed run rerun with the same settings
skips the parts it has and ends with the same file an uninterrupted run writes.

Data-parallel: under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) rank r runs batches
r, r + W, r + 2W, ... of that same plan and writes their parts into the same folder; rank 0
merges them. Every batch holds the rows it holds in a one-process run, so `samples.parquet`
is byte-identical to the one-process file (same hardware and settings).

One module, though over 500 lines: the decode loop, the batch plan and the part files make one
guarantee together (a row's response depends on its seed and row only, and a resumed or
data-parallel run writes the one-process file byte for byte); the prompt-file reader and the
sampling checks its callers share live here too.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError, OutputError
from ..parallel import process_group
from ..runio import open_partial_dir, read_table, write_parquet
from .loading import cache_kwarg, forward_params
from .text import encode_prompt, pad_id, pad_pairs

SAMPLES_FILE = "samples.parquet"
PARTIAL_DIR = "samples.partial"
COLUMNS = ["prompt_id", "prompt", "sample_id", "response", "n_tokens", "truncated", "seed", "model"]


# ----------------------------------------------------------------------------- argument checks

def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_sampling_args(*, num_samples: int = 1, max_new_tokens: int = 1, temperature: float = 1.0,
                        top_p: float = 1.0, top_k: int | None = None, seed: int = 0,
                        batch_size: int = 1) -> None:
    """Check sampling settings before any model loads or file is written.

    Raises
    ------
    InputError
        Naming the field: `num_samples`, `max_new_tokens` or `batch_size` not an integer >= 1;
        `temperature` not a finite number >= 0 (0 = greedy); `top_p` not in (0, 1]; `top_k`
        neither None nor an integer >= 0 (0 = no top-k); `seed` not an integer >= 0.
    """
    for name, v in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not _is_int(v) or v < 1:
            raise InputError(f"must be an integer >= 1; got {v!r}", field=name)
    if not _is_int(seed) or seed < 0:
        raise InputError(f"must be an integer >= 0; got {seed!r}", field="seed")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) \
            or not (np.isfinite(temperature) and temperature >= 0):
        raise InputError(f"must be a finite number >= 0 (0 = greedy); got {temperature!r}", field="temperature")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.number)) or not 0 < top_p <= 1:
        raise InputError(f"must be in (0, 1] (1 = no nucleus truncation); got {top_p!r}", field="top_p")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise InputError(f"must be an integer >= 0 (0 = no top-k) or unset; got {top_k!r}", field="top_k")


def check_device(device: str | None) -> None:
    """Check a `--device` value before the model loads: None, "auto", "cpu", "cuda", "cuda:N"
    (with CUDA available and N < the GPU count) or another device torch knows ("mps").

    Raises
    ------
    InputError
        A device string torch does not parse, or a CUDA device that is not there.
    """
    if device is None or device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)", field="device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{device!r} asked for, but CUDA is not available here (use cpu)", field="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{device!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible",
                             field="device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{device!r} asked for, but MPS is not available here (use cpu)", field="device")


# ----------------------------------------------------------------------------- prompts

def read_prompts(source: str, column: str = "prompt", split: str = "train",
                 limit: int | None = None) -> list[str]:
    """Prompts from a file (`.txt`: one per non-blank line; `.jsonl`/`.json`/`.csv`/`.parquet`:
    the `column`) or, when `source` is not a file, a Hugging Face dataset name.

    Returns
    -------
    list of str
        In file order (a prompt's index is its `prompt_id`); the first `limit` when given.

    Raises
    ------
    InputError
        Missing or empty file ("no prompts"), missing column, `limit` < 1, or a record whose
        prompt is not a non-empty string (naming file, record and field).
    """
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise InputError(f"must be an integer >= 1; got {limit!r}", field="limit")
    p = Path(source).expanduser()
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise InputError("no such file", file=str(p))
        prompts = [ln.rstrip("\r\n") for ln in p.read_text(encoding="utf-8").splitlines()]
        prompts = [x for x in prompts if x.strip()]
        if not prompts:
            raise InputError("no prompts (the file is empty)", file=str(p))
        return prompts[:limit] if limit is not None else prompts
    if p.exists() or str(source).startswith((".", "/", "~")) or p.suffix:
        if not p.exists():
            raise InputError("no such file", file=str(p))
        df = read_table(p, required=(column,))
        values = df[column].tolist()
    else:
        values = _hf_dataset_column(str(source), column, split)
    if limit is not None:
        values = values[:limit]
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v.strip():
            raise InputError(f"expected a non-empty string, got {v!r}"[:120], file=str(source),
                             record=i + 1, field=column)
    if not values:
        raise InputError("no prompts", file=str(source))
    return list(values)


def _hf_dataset_column(name: str, column: str, split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise InputError(f"'{name}' is not a file, and reading a Hugging Face dataset needs "
                         "the package datasets (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # hub/network/config errors: one line naming the dataset
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load dataset ({first})", file=name) from None
    if column not in ds.column_names:
        raise InputError(f"missing column (columns are: {', '.join(ds.column_names)})",
                         file=name, field=column)
    return list(ds[column])


# ----------------------------------------------------------------------------- planning

def plan_batches(prompt_lengths: Sequence[int], num_samples: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Deterministic batches of (prompt_id, sample_id) rows, longest prompts first.

    Rows of one prompt stay adjacent, so a batch mostly holds prompts of equal length
    (little padding) and the plan depends only on the lengths, K and the batch size.

    Returns
    -------
    list of list of (int, int)
        Every row (p, k), p < len(prompt_lengths), k < num_samples, exactly once.
    """
    if num_samples < 1 or batch_size < 1:
        raise InputError(f"num_samples and batch_size must be >= 1 (got {num_samples}, {batch_size})")
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    rows = [(p, k) for p in order for k in range(num_samples)]
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def row_uniforms(seed: int, rows: Sequence[tuple[int, int]], n: int) -> np.ndarray:
    """The uniforms row (prompt_id, sample_id) uses at each of its `n` decoding steps.

    Returns
    -------
    numpy.ndarray, shape (len(rows), n), float64 in [0, 1)
    """
    return np.stack([np.random.default_rng([int(seed), int(p), int(k)]).random(n) for p, k in rows])


# ----------------------------------------------------------------------------- sampling

_TOPK_FIRST = 256  # nucleus candidates tried before falling back to a full sort


def _inverse_cdf(probs, u):
    """Index j of the first cumulative mass > u * total, per row (probs: (B, n), u: (B,))."""
    import torch

    cum = probs.cumsum(-1)
    target = (u.to(cum.dtype) * cum[:, -1]).unsqueeze(-1)
    j = torch.searchsorted(cum, target, right=True)
    # j lands on a token with mass (cum rises there) unless rounding put the target at the
    # very top; then take the last token with mass (zeros need not be a suffix)
    pos = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, pos, 0).amax(-1, keepdim=True)
    return torch.minimum(j, last)


def _nucleus(sorted_probs, top_p: float):
    """Zero the tokens after the nucleus: those whose preceding mass already exceeds top_p."""
    cum = sorted_probs.cumsum(-1)
    return sorted_probs.masked_fill((cum - sorted_probs) > top_p, 0.0)


def sample_tokens(logits, u, temperature: float, top_p: float = 1.0, top_k: int | None = None):
    """Draw one token per row by inverse CDF of the (top-k, top-p truncated) distribution at
    that row's uniform, tokens ordered by decreasing probability.

    Exact, and cheap at large vocabularies: the nucleus is looked for among the 256 likeliest
    tokens (`topk`); only rows whose nucleus is wider look among 4096, then the whole
    vocabulary. Which candidate set is used depends on the row alone, never on the batch.

    Parameters
    ----------
    logits : torch.Tensor, shape (B, V)
    u : torch.Tensor, shape (B,), uniforms in [0, 1)
    temperature : float > 0
    top_p : float in (0, 1]
    top_k : int, optional

    Returns
    -------
    torch.LongTensor, shape (B, 1): the chosen token ids.
    """
    import torch

    # every pass over the (B, V) logits costs about as much as the whole sampler's other work:
    # no copy for the dtype or for temperature 1 (x / 1 is x exactly, so the draw is the same)
    logits = logits.float()
    if temperature != 1:
        logits = logits / temperature
    V = logits.shape[-1]
    if top_p >= 1.0 and not top_k:  # no truncation: the natural order serves as well
        return _inverse_cdf(torch.softmax(logits, -1), u)
    if top_k:  # top-k renormalized, then the nucleus inside it
        vals, idx = torch.topk(logits, min(V, top_k), dim=-1)
        return idx.gather(1, _inverse_cdf(_nucleus(torch.softmax(vals, -1), top_p), u))
    chosen = torch.empty((len(u), 1), dtype=torch.long, device=logits.device)
    rows = torch.arange(len(u), device=logits.device)
    lse = None
    # widen the candidate set only for rows whose nucleus does not fit: a few rows with a flat
    # distribution must not make every row pay for a full sort of the vocabulary
    for k in (_TOPK_FIRST, 16 * _TOPK_FIRST, V):
        k = min(k, V)
        vals, idx = torch.topk(logits if lse is None else logits[rows], k, dim=-1)
        if lse is None:
            # log of the softmax total, as torch.logsumexp computes it (max, then the sum of
            # exp(x - max)), with the max the first top-k value instead of another pass
            lse = vals[:, :1] + (logits - vals[:, :1]).exp_().sum(-1, keepdim=True).log()
        probs = torch.exp(vals - lse[rows])
        fits = probs.sum(-1) >= top_p if k < V else torch.ones(len(rows), dtype=torch.bool, device=rows.device)
        if bool(fits.any()):
            f = fits.nonzero().squeeze(-1)
            chosen[rows[f]] = idx[f].gather(1, _inverse_cdf(_nucleus(probs[f], top_p), u[rows[f]]))
        rows = rows[~fits]
        if len(rows) == 0:
            break
    return chosen


def _stop_ids(model, tokenizer) -> list[int]:
    ids = []
    gc_eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
    for e in (gc_eos if isinstance(gc_eos, (list, tuple)) else [gc_eos]) + [tokenizer.eos_token_id]:
        if e is not None and e not in ids:
            ids.append(int(e))
    return ids


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of two or more token sequences, at most one less
    than the shortest (every prompt keeps a token of its own, whose logits start its answer);
    0 for fewer than two sequences.

    >>> shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]])
    2
    >>> shared_prefix_length([[1, 2], [1, 2]])
    1
    """
    if len(prompts) < 2:
        return 0
    n = 0
    limit = min(len(x) for x in prompts) - 1
    first = prompts[0]
    while n < limit and all(x[n] == first[n] for x in prompts):
        n += 1
    return n


def generate_batch(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                   uniforms: np.ndarray | None = None, cache: str = "buffer", share_prefix: bool = True,
                   compact_at: int = 8):
    """Generate one batch: the prompts' common prefix once, then each prompt's own tokens
    left-padded after it, then one token per row per step.

    A row's tokens are those it gets alone (batch size 1) up to float rounding: the same
    positions and keys, but matrix products of other shapes (the prefix for one row, padding),
    which can round differently in the last bit and, rarely, flip a sampled token. Measured
    on the demo's sample stage (SmolLM2-135M, 424 rows, 48 tokens, top-p 0.9): 2 rows of 424
    differ from the layout without the shared prefix (one checked: that layout gave its tokens
    alone); batches of 128 or one of 424 give the same rows. The tests check token equality on
    a tiny model.

    Parameters
    ----------
    prompt_ids : sequence of list of int, length B
        Token ids of each formatted prompt.
    max_new_tokens : int
    temperature : float
        0 means greedy decoding (then `uniforms` is ignored).
    top_p, top_k : nucleus and top-k truncation
    uniforms : numpy.ndarray, shape (B, max_new_tokens)
        Per-row uniforms (`row_uniforms`); required when temperature > 0.
    cache : {"buffer", "dynamic"}
        "buffer" (default): keys, values and the attention mask live in buffers sized once
        for prompt + `max_new_tokens` and are written in place (`dualign.models.kvcache`).
        "dynamic": transformers' `DynamicCache`, grown by concatenation every step (the old
        path, kept for the side-by-side bench). Both run the same model computation on the
        same values, so they give identical tokens: attention reads a strided view instead of
        a contiguous copy, which could in principle round differently in the last bit and flip
        a token; the tests compare the two token for token and no flip has been seen (nor on
        128 rows of the demo's prompts, SmolLM2-135M, 48 tokens).
    share_prefix : bool
        Run the prompts' longest common prefix once (default); False runs every prompt whole,
        left-padded (the old layout, kept for the side-by-side bench).
    compact_at : int >= 1
        Finished rows leave the batch (a copy of the whole cache) once they are 1/`compact_at`
        of it, and ride along, their tokens ignored, until then; a large value drops them at
        once (the old behaviour, kept for the bench). The tokens do not depend on it.

    Returns
    -------
    list of (list[int], bool)
        Per row: the generated token ids up to and including the stop token (padding
        removed), and whether it hit `max_new_tokens` without stopping.

    Raises
    ------
    ValueError
        Sampling without `uniforms`, an unknown `cache`, or `compact_at` < 1.
    """
    import torch

    sampling = bool(temperature and temperature > 0)
    if sampling and uniforms is None:
        raise ValueError("sampling (temperature > 0) needs per-row uniforms")
    if cache not in ("buffer", "dynamic"):
        raise ValueError(f"cache must be 'buffer' or 'dynamic'; got {cache!r}")
    if compact_at < 1:
        raise ValueError(f"compact_at must be >= 1; got {compact_at}")
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    # Each distinct prompt is run once; its rows (the K samples of a prompt) share its key/value
    # cache and last logits. The prompt is as long as the answer in our runs, so with K = 4
    # this drops about 3/8 of the tokens a batch runs through the model.
    distinct: dict[tuple, int] = {}
    row_prompt = torch.tensor([distinct.setdefault(tuple(x), len(distinct)) for x in prompt_ids])
    prompts = list(distinct)  # dicts keep their order
    T = max(len(x) for x in prompts)
    # The prompts' longest common prefix (a chat template's system prompt: 24 of the demo
    # prompts' 36-45 tokens) runs once, for one row, and its cache is copied to every prompt;
    # the prefill then runs only what follows it. Layout: the prefix, left padding, the rest.
    S = shared_prefix_length(prompts) if share_prefix else 0
    ids, att, _, _ = pad_pairs([(list(x[S:]), []) for x in prompts], pad, "left")
    # the attention mask for the whole decode, written once: the prefix, the padded rest, then
    # ones for every position a new token can take; step s reads its first T + s + 1 columns
    att = torch.cat([att.new_ones((len(prompts), S)), att, att.new_ones((len(prompts), max_new_tokens))], dim=-1)
    stops = _stop_ids(model, tokenizer)
    stop_t = torch.tensor(stops, dtype=torch.long)
    u_all = torch.as_tensor(uniforms, dtype=torch.float64) if sampling else None
    toks: list[list[int]] = [[] for _ in prompt_ids]
    stopped = [False] * len(prompt_ids)
    # Our own decode loop rather than `model.generate`: finished rows leave the batch (and the
    # KV cache), so a batch costs what its live rows cost, and no per-step logits processors run
    # over the whole vocabulary. Each row's token is `sample_tokens` at the row's own uniform,
    # so a row's output does not depend on its batch (up to float rounding). Leaving copies the
    # whole cache (at the demo's 424 rows, 1.8 GB, 8% of the stage when done at every step a
    # row finished), so finished rows ride along, their tokens ignored, until they are
    # 1/`compact_at` of the batch.
    live = torch.arange(len(prompt_ids))  # the batch's rows
    active = torch.ones(len(prompt_ids), dtype=torch.bool)  # those still generating
    att, ids = att.to(device), ids.to(device)
    plen = att[:, :T].sum(-1, keepdim=True)  # real prompt tokens: the next position id
    if cache == "buffer":
        from .kvcache import BufferCache
        kv_cache = BufferCache(T + max_new_tokens)
    else:
        from transformers import DynamicCache
        kv_cache = DynamicCache()
    kv = {cache_kwarg(model): kv_cache}  # the cache travels under the model's own keyword
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(model) else {}
    with torch.no_grad():
        if S:
            model(input_ids=torch.tensor([prompts[0][:S]], device=device), use_cache=True, **kv, **keep_last)
            kv_cache.batch_select_indices(torch.zeros(len(prompts), dtype=torch.long, device=device))
        # position ids count real tokens only: padding leaves every token the position it has alone
        out = model(input_ids=ids, attention_mask=att[:, :T],
                    position_ids=(att[:, :T].cumsum(-1) - 1).clamp(min=0)[:, S:], use_cache=True, **kv, **keep_last)
        logits = out.logits[:, -1]
        del out
        if len(distinct) < len(prompt_ids):  # one row per sample from here on
            sel = row_prompt.to(device)
            kv_cache.batch_select_indices(sel)
            logits, att, plen = logits[sel], att[sel], plen[sel]
        for step in range(max_new_tokens):
            if sampling:
                nxt = sample_tokens(logits, u_all[live, step].to(device), float(temperature), float(top_p), top_k)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            nxt = nxt.cpu()
            done = torch.isin(nxt[:, 0], stop_t) & active
            for r, t, a, d in zip(live.tolist(), nxt[:, 0].tolist(), active.tolist(), done.tolist()):
                if a:
                    toks[r].append(t)
                    stopped[r] = d
            active &= ~done
            if step == max_new_tokens - 1 or not bool(active.any()):
                break
            if int((~active).sum()) * compact_at >= len(active):  # drop finished rows from the batch and cache
                sel = active.nonzero().squeeze(-1)
                live, nxt, active = live[sel], nxt[sel], active[sel]
                sel = sel.to(device)
                att, plen = att[sel], plen[sel]
                kv_cache.batch_select_indices(sel)
            logits = model(input_ids=nxt.to(device), attention_mask=att[:, :T + step + 1],
                           position_ids=plen + step, use_cache=True, **kv).logits[:, -1]
    return [(t, not s) for t, s in zip(toks, stopped)]


def _decode(tokenizer, toks: list[int], stops: list[int]) -> str:
    if toks and toks[-1] in stops:
        toks = toks[:-1]
    return tokenizer.decode(toks, skip_special_tokens=True)


def sample_settings(model_name: str, prompts: Sequence[str], *, num_samples: int, max_new_tokens: int,
                    temperature: float, top_p: float, top_k: int | None, seed: int,
                    batch_size: int, template: str | None, backend: str = "hf") -> dict:
    """Everything the samples depend on (a prompts digest instead of the prompts)."""
    from ..runio import stream_digest

    h = stream_digest(["\x00".join(prompts).encode("utf-8")])
    return {"model": model_name, "prompts_sha256": h, "n_prompts": len(prompts),
            "num_samples": num_samples, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
            "batch_size": batch_size, "template": template, "backend": backend}


def sample(model, tokenizer, prompts: Sequence[str], *, num_samples: int = 1,
           max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 0.9,
           top_k: int | None = None, seed: int = 0, batch_size: int = 16,
           template: str | None = None, model_name: str = "", out_dir: str | Path | None = None,
           progress: bool = True) -> pd.DataFrame:
    """Sample `num_samples` responses to every prompt.

    Parameters
    ----------
    model, tokenizer : from `load_policy` (any HF causal LM and its tokenizer)
    prompts : sequence of str, length N
    num_samples : int
        K responses per prompt.
    max_new_tokens : int
    temperature, top_p, top_k : sampling settings (temperature 0: greedy)
    seed : int >= 0
        With the same settings, the same seed gives the same samples.
    batch_size : int
        Rows (prompt, sample) per `generate` call.
    template : str, optional
        Prompt template with `{prompt}`; default: chat template, else the PKU template.
    model_name : str
        Written to the `model` column and part of the resume key.
    out_dir : path, optional
        Run directory: finished batches go to `out_dir/samples.partial/` and the result to
        `out_dir/samples.parquet` (atomically). An existing result with the same settings
        is returned without sampling; a partial run with the same settings is resumed.
        Under a distributed launch every rank must see the same `out_dir` (one machine, or
        a shared file system).
    progress : bool
        Show a tqdm bar (rank 0's shard only, under a distributed launch).

    Returns
    -------
    pandas.DataFrame, N*K rows sorted by (prompt_id, sample_id)
        Columns `COLUMNS`: n_tokens counts generated tokens including the stop token;
        truncated is True when a response hit max_new_tokens. `df.attrs["dualign"]`
        holds the settings. The same table on every rank of a distributed launch (the
        others read the file rank 0 wrote, or receive the parts when there is no `out_dir`).

    Raises
    ------
    InputError
        Bad settings (`check_sampling_args`), checked before anything is written to `out_dir`;
        bad launcher variables (`dualign.runio.dist_info`).
    OutputError
        Under a distributed launch, a part another rank wrote is not visible to rank 0.

    Notes
    -----
    Distributed (WORLD_SIZE > 1): a torch.distributed group is initialized when none is
    (gloo on CPU, NCCL with CUDA; see `dualign.parallel.process_group`); rank r generates
    batches r, r + W, ... of the one-process plan, a barrier, rank 0 writes the merged
    file, a barrier. A killed launch, rerun the same way (any world size), redoes only the
    batches whose parts are missing.
    """
    check_sampling_args(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size)
    prompts = list(prompts)
    settings = sample_settings(model_name, prompts, num_samples=num_samples,
                               max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size,
                               template=template)
    with process_group() as group:
        final = part_dir = None
        if out_dir is not None:
            final, part_dir = Path(out_dir) / SAMPLES_FILE, Path(out_dir) / PARTIAL_DIR
            old = None
            if group.rank == 0:
                if final.exists():
                    old = pd.read_parquet(final)
                    if old.attrs.get("dualign") != settings:
                        old = None
                if old is None:
                    open_partial_dir(part_dir, settings)
            # every rank takes rank 0's word (a collective, so the partial folder is ready when
            # the others go on): ranks looking at the folder each on its own could disagree
            if group.broadcast(old is not None):
                return old if group.rank == 0 else pd.read_parquet(final)

        encoded = [encode_prompt(tokenizer, p, template) for p in prompts]
        # The plan is the same whatever the world size, and rank r runs batches r, r + W, ...:
        # each batch holds the rows it holds in a one-process run (so the same numbers, bit
        # for bit, and parts from any world size resume any other); round robin over batches
        # sorted longest prompts first gives every rank a like mix of lengths.
        batches = plan_batches([len(x) for x in encoded], num_samples, batch_size)
        mine = range(group.rank, len(batches), group.world_size)
        stops = _stop_ids(model, tokenizer)
        parts: dict[int, pd.DataFrame] = {}
        bar = None
        if progress and group.rank == 0:
            from tqdm.auto import tqdm
            desc = "sampling" if group.world_size == 1 else f"sampling (rank 0 of {group.world_size})"
            bar = tqdm(total=sum(len(batches[b]) for b in mine), desc=desc, unit="resp")
        for b in mine:
            rows = batches[b]
            path = part_dir / _part_name(b) if part_dir is not None else None
            if path is not None and path.exists():
                df = pd.read_parquet(path)
            else:
                res = generate_batch(model, tokenizer, [encoded[p] for p, _ in rows],
                                     max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, top_k=top_k,
                                     uniforms=row_uniforms(seed, rows, max_new_tokens))
                df = pd.DataFrame({
                    "prompt_id": np.array([p for p, _ in rows], dtype=np.int64),
                    "prompt": [prompts[p] for p, _ in rows],
                    "sample_id": np.array([k for _, k in rows], dtype=np.int64),
                    "response": [_decode(tokenizer, t, stops) for t, _ in res],
                    "n_tokens": np.array([len(t) for t, _ in res], dtype=np.int64),
                    "truncated": np.array([tr for _, tr in res], dtype=bool),
                })
                if path is not None:
                    write_parquet(df, path)
            parts[b] = df
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix(tokens=int(sum(int(d["n_tokens"].sum()) for d in parts.values())))
        if bar is not None:
            bar.close()

        if part_dir is None:  # nothing on disk: the parts travel between ranks
            for other in group.gather(parts):
                parts.update(other)
            out = _assemble([parts[b] for b in range(len(batches))], seed, model_name)
            out.attrs["dualign"] = settings
            return out
        group.barrier()  # every rank's parts are on disk
        if group.rank == 0:
            for b in range(len(batches)):
                if b not in parts:
                    parts[b] = _read_part(part_dir, b, group.world_size)
            out = _assemble([parts[b] for b in range(len(batches))], seed, model_name)
            out.attrs["dualign"] = settings
            write_parquet(out, final)
            shutil.rmtree(part_dir, ignore_errors=True)
        group.barrier()  # the merged file is there
        return out if group.rank == 0 else pd.read_parquet(final)


def _part_name(b: int) -> str:
    return f"batch-{b:06d}.parquet"


def _read_part(part_dir: Path, b: int, world_size: int) -> pd.DataFrame:
    """Batch `b`'s part, written by rank b % world_size; raises OutputError when it is not there."""
    path = part_dir / _part_name(b)
    if not path.exists():
        raise OutputError(f"the part of rank {b % world_size} is not visible to rank 0: under a "
                          "multi-machine launch --out must be on a file system every rank sees",
                          file=str(path))
    return pd.read_parquet(path)


def _assemble(parts: list[pd.DataFrame], seed: int, model_name: str) -> pd.DataFrame:
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        {c: [] for c in COLUMNS[:-2]})
    df["seed"] = np.int64(seed)
    df["model"] = model_name
    return df.sort_values(["prompt_id", "sample_id"], kind="stable").reset_index(drop=True)[COLUMNS]


# ----------------------------------------------------------------------------- vLLM

def sample_vllm(model_spec: str, prompts: Sequence[str], *, num_samples: int = 1,
                max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 0.9,
                top_k: int | None = None, seed: int = 0, template: str | None = None,
                dtype: str = "auto") -> pd.DataFrame:
    """The same table as `sample`, generated by vLLM (GPU only; `pip install vllm`).

    Each row gets vLLM's per-request seed derived from (seed, prompt_id, sample_id), so
    results are reproducible with vLLM, though not token-identical to the HF backend.
    Not resumable: vLLM schedules the whole set at once.

    Raises
    ------
    InputError
        Bad settings (`check_sampling_args`), or vllm is not installed.
    """
    check_sampling_args(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, seed=seed)
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise InputError("the vllm backend needs the package vllm (pip install vllm; GPU only)") from None
    from .loading import load_tokenizer, resolve_spec

    where, _ = resolve_spec(model_spec)
    tok = load_tokenizer(model_spec)
    llm = LLM(model=str(where), dtype=dtype, seed=seed)
    rows = [(p, k) for p in range(len(prompts)) for k in range(num_samples)]
    reqs, params = [], []
    for p, k in rows:
        reqs.append({"prompt_token_ids": encode_prompt(tok, prompts[p], template)})
        row_seed = int(np.random.default_rng([seed, p, k]).integers(2**31 - 1))
        params.append(SamplingParams(n=1, temperature=temperature, top_p=top_p,
                                     top_k=top_k if top_k else -1, max_tokens=max_new_tokens,
                                     seed=row_seed))
    outs = llm.generate(reqs, params)
    df = pd.DataFrame({
        "prompt_id": np.array([p for p, _ in rows], dtype=np.int64),
        "prompt": [prompts[p] for p, _ in rows],
        "sample_id": np.array([k for _, k in rows], dtype=np.int64),
        "response": [o.outputs[0].text for o in outs],
        "n_tokens": np.array([len(o.outputs[0].token_ids) for o in outs], dtype=np.int64),
        "truncated": np.array([o.outputs[0].finish_reason == "length" for o in outs], dtype=bool),
    })
    return _assemble([df], seed, model_spec)
