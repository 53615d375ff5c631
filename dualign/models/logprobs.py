"""Sequence log-probabilities log π(y|x), batched by length, exact whatever the padding.

Training (DPO's reference log-probs), PeCAN's implicit scores `β log π_r/π_ref` and the
`dualign logprobs` command all read log-probs from here, so a response is scored the same
way everywhere (tokenized by `dualign.models.text.encode_pairs`).
"""
from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np

from ..parallel import process_group
from .text import encode_pairs, pad_id, pad_pairs, response_logps


def _forward_params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # e.g. a compiled or wrapped module
        return set()


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None):
    """Index batches over rows sorted by length (longest first), so padding is small and an
    out-of-memory error, if any, comes from the first batch.

    Parameters
    ----------
    lengths : sequence of int, shape (n,)
    batch_size : int
        Most rows per batch.
    max_batch_tokens : int, optional
        Most padded tokens (rows × longest row) per batch; a single longer row still forms
        its own batch.

    Returns
    -------
    list of list of int
        Every index 0..n-1 exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # stable sort: equal lengths keep input order, so batches are reproducible
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur = [], []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= batch_size or
                    (max_batch_tokens is not None and (len(cur) + 1) * longest > max_batch_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def logprobs(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
             batch_size: int = 8, max_batch_tokens: int | None = 8192,
             template: str | None = None, append_eos: bool | Sequence[bool] = True,
             max_length: int | None = None, padding_side: str = "right",
             progress: bool = False):
    """log π(y|x) summed over response tokens, for every (prompt, response) pair.

    Pairs are tokenized by `encode_pairs` (prompt formatted by the chat template, else the
    PKU template or `template`; response tokenized alone and ended by EOS), sorted by length
    and run in batches under `torch.no_grad`. Position ids are derived from the attention
    mask, so the result does not depend on the batch size or the padding side (up to float
    rounding: within 1e-4 of scoring each pair alone in fp32).

    Parameters
    ----------
    model : transformers causal LM (or a PEFT wrapper of one)
    tokenizer : transformers tokenizer
    prompts, responses : sequence of str, shape (n,)
    batch_size : int
        Most pairs per forward pass.
    max_batch_tokens : int or None
        Most padded tokens per forward pass (bounds the (B, T, V) logits memory).
    template : str, optional
        Prompt template with a `{prompt}` slot, overriding the chat template.
    append_eos : bool or sequence of bool, shape (n,)
        Count the EOS that ends the response (True: the probability of stopping there).
        Per row for sampled responses: False where the sample was truncated (it never
        emitted EOS), i.e. `~samples["truncated"]`.
    max_length : int, optional
        Truncate pairs longer than this (response first kept; see `encode_pairs`).
    padding_side : {"right", "left"}
        Only changes the layout of the batches, never the result.
    progress : bool
        Show a tqdm bar (rank 0's shard only, under a distributed launch).

    Returns
    -------
    logp : numpy.ndarray, shape (n,), float64
        Summed log-probabilities in nats, in the input order; the whole array on every rank
        of a distributed launch.
    n_tokens : numpy.ndarray, shape (n,), int64
        Response tokens counted (EOS included when `append_eos`).

    Raises
    ------
    ValueError
        `prompts` and `responses` differ in length, or a bad `padding_side`/`batch_size`.
    InputError
        Bad launcher variables (`dualign.runio.dist_info`).

    Notes
    -----
    Distributed (WORLD_SIZE > 1, or a torch.distributed group already initialized): a
    collective, so every rank calls it with the same pairs. Rank r runs batches r, r + W, ...
    of the one-process batch plan and the ranks exchange their results, so every rank returns
    the array one process computes, bit for bit (same batches, same numbers) when the ranks
    run on the same kind of device.
    """
    if isinstance(append_eos, (bool, np.bool_)):
        pairs = encode_pairs(tokenizer, prompts, responses, template=template,
                             append_eos=bool(append_eos), max_length=max_length)
    else:  # per row: a response cut at max_new_tokens never emitted its EOS
        flags = [bool(f) for f in append_eos]
        if len(flags) != len(prompts):
            raise ValueError(f"{len(flags)} append_eos flags for {len(prompts)} pairs")
        pairs = [encode_pairs(tokenizer, [p], [r], template=template, append_eos=f,
                              max_length=max_length)[0]
                 for p, r, f in zip(prompts, responses, flags)]
    n = len(pairs)
    logp = np.zeros(n, dtype=np.float64)
    n_tok = np.array([len(r) for _, r in pairs], dtype=np.int64)
    if n == 0:
        return logp, n_tok
    pad = pad_id(tokenizer)
    params = _forward_params(model)
    # PEFT wrappers forward **kwargs; look at the wrapped model's signature too
    base = getattr(model, "get_base_model", None)
    if base is not None:
        params |= _forward_params(base())
    device = next(model.parameters()).device
    batches = length_batches([len(p) + len(r) for p, r in pairs], batch_size, max_batch_tokens)
    with process_group() as group:
        # The plan is the same whatever the world size, and rank r runs batches r, r + W, ...:
        # each batch holds the rows it holds in one process, so each row gets the same number,
        # bit for bit; round robin over batches sorted longest first evens out the ranks' loads.
        mine = batches[group.rank::group.world_size]
        _forward_batches(model, params, pairs, mine, pad, padding_side, device, logp,
                         progress and group.rank == 0, group.world_size)
        if group.distributed:
            rows = np.array([i for idx in mine for i in idx], dtype=np.int64)
            for their_rows, their_logp in group.gather((rows, logp[rows])):
                logp[their_rows] = their_logp
    return logp, n_tok


def _forward_batches(model, params: set[str], pairs, batches, pad_id: int, padding_side: str, device,
                     logp: np.ndarray, progress: bool, world_size: int) -> None:
    """Fill `logp[idx]` for every index batch `idx` in `batches` (the body of `logprobs`)."""
    import torch

    if progress:
        from tqdm.auto import tqdm
        desc = "log-probs" if world_size == 1 else f"log-probs (rank 0 of {world_size})"
        batches = tqdm(batches, desc=desc, unit="batch")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for idx in batches:
                ids, att, pos, resp = pad_pairs([pairs[i] for i in idx], pad_id, padding_side)
                kwargs = {"input_ids": ids.to(device), "attention_mask": att.to(device)}
                if "position_ids" in params:
                    kwargs["position_ids"] = pos.to(device)
                # Only positions from the first response token on are needed: keep just those
                # logits (the vocabulary is large; this is most of the memory).
                first = int(resp.argmax(-1).min())
                keep = min(ids.shape[1], ids.shape[1] - first + 1)
                if "logits_to_keep" in params:
                    kwargs["logits_to_keep"] = keep
                    ids, resp = ids[:, -keep:], resp[:, -keep:]
                logits = model(**kwargs).logits
                if logits.shape[1] != ids.shape[1]:  # model ignored logits_to_keep
                    logits = logits[:, -ids.shape[1]:]
                lp = response_logps(logits, ids.to(device), resp.to(device))
                logp[idx] = lp.double().cpu().numpy()
    finally:
        model.train(was_training)


def samples_append_eos(samples, append_eos: bool = True):
    """`append_eos` for `logprobs` on a samples table: per row, False where the response was
    cut at max_new_tokens (it never emitted the EOS, so scoring one would be wrong)."""
    if not append_eos or "truncated" not in samples.columns:
        return append_eos
    return ~samples["truncated"].to_numpy(bool)
