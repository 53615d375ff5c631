"""Log-probabilities of both responses of every pair in a collated batch, with gradients:
`pair_logps` (one forward pass over the concatenated layout, or the prompts once with their
key/value cache reused by both responses), the response lengths and the label-weighted NLL of
`PreferenceConfig.sft_weight`. Used by the trainer's loss and by the reference pass alike, so
Δ is 0 before the first update. torch is imported inside the functions: importing this module
stays light.
"""
from __future__ import annotations

from ..models.loading import cache_kwarg, forward_params
from ..models.text import response_logps


def pair_logps(model, batch):
    """log π(y1|x) and log π(y0|x) of a collated batch, each shape (B,), for either layout.

    Concatenated layout: one forward pass over the 2B sequences, building logits only from
    the first response position on (`logits_to_keep`). Shared-prompt layout: the B prompts
    once (keeping their key/value cache and last logits), then the 2B responses on top of
    the cache repeated per pair; gradients flow through the cache into the prompt's
    activations, so value and gradient equal the concatenated computation.

    Parameters
    ----------
    model : causal LM (or a PEFT/DDP wrapper of one)
    batch : dict of torch.Tensor
        From `PreferenceCollator`, on the model's device. A batch with `inputs_embeds` (the
        frozen blocks' recorded output) must be run inside `frozen_blocks.from_block`.

    Returns
    -------
    logp_1, logp_0 : torch.Tensor, shape (B,), float32
    """
    if "prompt_input_ids" in batch:
        return _shared_prompt_logps(model, batch)
    ids, att, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    first = int(resp.argmax(-1).min())
    keep = ids.shape[1] - first + 1 if first > 0 else ids.shape[1]
    kwargs = {**_model_inputs(batch, "input_ids", "inputs_embeds"), "attention_mask": att, "use_cache": False}
    if keep < ids.shape[1] and "logits_to_keep" in forward_params(model):
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits
    T = logits.shape[1]
    logp = response_logps(logits, ids[:, -T:], resp[:, -T:])
    return logp.chunk(2, dim=0)


def _model_inputs(batch, ids_key: str, embeds_key: str) -> dict:
    """The model's input: the frozen blocks' recorded output when the batch carries it (the
    caller runs the model `from_block`), else the token ids."""
    if embeds_key in batch:
        return {"inputs_embeds": batch[embeds_key]}
    return {"input_ids": batch[ids_key]}


def response_lengths(batch):
    """Response token counts (n_1, n_0) of a collated batch, each shape (B,), either layout:
    shared-prompt rows alternate y1, y0; concatenated rows are all y1, then all y0."""
    n = batch["response_mask"].sum(-1).float()
    return (n[0::2], n[1::2]) if "prompt_input_ids" in batch else n.chunk(2, dim=0)


def label_weighted_nll(logp_1, logp_0, n_1, n_0, labels):
    """Mean over pairs of p · NLL(y1) + (1 − p) · NLL(y0), NLL = −log π(y|x) / |y| (nats per
    token); all arguments shape (B,). The likelihood term of `PreferenceConfig.sft_weight`."""
    p = labels.to(logp_1.dtype)
    return (-(p * logp_1 / n_1.clamp(min=1)) - (1 - p) * logp_0 / n_0.clamp(min=1)).mean()


def _shared_prompt_logps(model, batch):
    """log π(y1|x) and log π(y0|x), shape (B,) each, running each prompt once for both answers.

    `batch` is the shared-prompt layout of `PreferenceCollator`: B left-padded prompts and 2B
    right-padded responses (row 2i: pair i's y1, row 2i+1: its y0). The prompts run first
    with a KV cache, keeping only the last position's logits (they predict each response's
    first token); the cache is repeated so that every prompt row serves its two responses;
    then the responses run on that cache with position ids that continue each prompt's own
    length (left padding makes prompt lengths differ) and an attention mask that covers the
    prompt's real tokens and the response's. The sum over response tokens of their
    log-probabilities equals the concatenated layout's to float tolerance (tests).
    """
    import torch

    pm = batch["prompt_attention_mask"]
    rid, rm = batch["input_ids"], batch["attention_mask"]
    ppos = (pm.cumsum(-1) - 1).clamp(min=0)
    out = model(**_model_inputs(batch, "prompt_input_ids", "prompt_inputs_embeds"), attention_mask=pm,
                position_ids=ppos, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(2)  # rows 2i and 2i+1: pair i's y1 and y0
    rpos = pm.sum(-1).repeat_interleave(2)[:, None] + torch.arange(rid.shape[1], device=rid.device)[None]
    att = torch.cat([pm.repeat_interleave(2, dim=0), rm], dim=1)
    logits = model(**_model_inputs(batch, "input_ids", "inputs_embeds"), attention_mask=att, position_ids=rpos,
                   use_cache=True, **{cache_kwarg(model): cache}).logits
    # the first response token is predicted by the prompt's last position
    first = out.logits[:, -1].float().repeat_interleave(2, dim=0)
    lp_first = first.gather(1, rid[:, :1]).squeeze(1) - torch.logsumexp(first, dim=-1)
    logp = lp_first * rm[:, 0].to(first.dtype) + response_logps(logits, rid, rm)
    return logp[0::2], logp[1::2]


def _supports_shared_prompt(model) -> bool:
    """Whether the model's forward takes what the shared-prompt layout passes (a cache with
    batch repetition, position ids, `logits_to_keep`); otherwise the concatenated layout."""
    params = forward_params(model)
    has_cache_arg = "cache" in params or "past_key_values" in params
    return has_cache_arg and {"position_ids", "logits_to_keep", "use_cache"} <= params
