"""Reference log-probs log π_ref(y|x): `reference_logps` scores every pair once, before training,
with the training forward itself (`pair_logps`) under no_grad, optionally recording what enters
the lowest adapted transformer block (`cache_frozen_blocks`) and checking that the model runs
exactly from it; `weights_digest` identifies the reference's weights for the on-disk cache (and a
training run's base model).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..models.text import pad_id
from ..runio import stream_digest
from .frozen_blocks import capture_block_inputs, from_block
from .pairs_data import PreferenceCollator, tokenize_pairs
from .policy_logps import _supports_shared_prompt, pair_logps
from .preference_config import PreferenceConfig


def weights_digest(model) -> str:
    """Identity of a model's weights: a digest (`runio.stream_digest`) of its class and of every
    parameter and persistent buffer, each by name, dtype, shape and bytes.

    Every weight counts, so a model whose LoRA adapter was merged into one linear layer differs
    from its base (a summary of a few tensors cannot tell them apart, and a cache keyed by one
    would hand the base's reference log-probs to the merged model). Tied weights count once.
    Cost: one sha256 pass over the weights, about 1 GB/s on one CPU core; tensors on a GPU
    are copied to the CPU one at a time. Parameters on the meta device (offloaded by
    accelerate) count by name, dtype and shape only.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    str
        16 hex digits.
    """
    import torch

    def parts():
        yield type(model).__name__.encode()
        tensors = list(model.named_parameters())
        for mod_name, mod in model.named_modules():
            skip = getattr(mod, "_non_persistent_buffers_set", set())  # rotary caches: derived, may change
            tensors += [(f"{mod_name}.{n}" if mod_name else n, b) for n, b in mod._buffers.items()
                        if b is not None and n not in skip]
        for name, t in tensors:
            yield f"\x00{name}\x00{t.dtype}\x00{tuple(t.shape)}\x00".encode()
            if t.device.type != "meta":
                # raw bytes, whatever the dtype (numpy has no bfloat16)
                yield t.detach().reshape(-1).view(torch.uint8).cpu().numpy()

    with torch.no_grad():
        return stream_digest(parts())


# The reference log-prob cache's name for it (imported under this name by `preference`).
_model_fingerprint = weights_digest


def reference_logps(model, tokenizer, pairs: pd.DataFrame, config: PreferenceConfig,
                    features: list[dict] | None = None, disable_adapter: bool = False,
                    progress: bool = True, record_block: int = 0):
    """log π_ref(y0|x) and log π_ref(y1|x) of every pair, with `model` as the reference.

    Computed by the very code that computes the policy's log-probs in training (same
    tokens, same collator layout, `pair_logps`), under `torch.no_grad` in eval mode, in
    length-sorted batches of `config.ref_batch_size` pairs; so before the first update Δ is
    0 up to float rounding, and the values equal `dualign.models.logprobs.logprobs` (within
    1e-4). The shared-prompt layout runs each prompt once.

    Parameters
    ----------
    model, tokenizer : the reference policy and its tokenizer
    pairs : pandas.DataFrame with `prompt`, `response_0`, `response_1`
    config : PreferenceConfig
        Tokenization (`template`, `max_length`, `append_eos`), `ref_batch_size`, `share_prompt`.
    features : list of dict, optional
        `tokenize_pairs(tokenizer, pairs, config)`, when already computed.
    disable_adapter : bool
        Score a PEFT model with its adapters off (its base is the reference).
    progress : bool
        Show a tqdm bar (pairs).
    record_block : int
        > 0: also record what enters this transformer block for every pair
        (`cache_frozen_blocks`), and check on the first batch that the model run
        `from_block` on it gives the same log-probs (within 1e-3 nats).

    Returns
    -------
    ref_logp_0, ref_logp_1 : numpy.ndarray, shape (n,), float64, in input order
    block_inputs : list of dict or None
        Only with `record_block`: per pair, float32 CPU tensors (n_tokens, hidden) under
        `block_input_prompt_1`, `block_input_response_1`, `block_input_prompt_0`,
        `block_input_response_0` (what `PreferenceCollator` pads into `inputs_embeds`);
        None when the check failed (the model does not run exactly from a block's input).
    """
    import contextlib

    import torch
    from tqdm.auto import tqdm

    from ..models.logprobs import length_batches

    feats = features if features is not None else tokenize_pairs(tokenizer, pairs, config)
    collate = PreferenceCollator(pad_id(tokenizer),
                                 share_prompt=config.share_prompt and _supports_shared_prompt(model))
    lengths = [max(len(f["prompt_ids_0"]) + len(f["response_ids_0"]),
                   len(f["prompt_ids_1"]) + len(f["response_ids_1"])) for f in feats]
    device = next(model.parameters()).device
    r0 = np.zeros(len(feats))
    r1 = np.zeros(len(feats))
    records: list | None = [None] * len(feats) if record_block else None
    captured: list = []
    checked = False
    ctx = (model.disable_adapter() if disable_adapter and hasattr(model, "disable_adapter")
           else contextlib.nullcontext())
    capture = (capture_block_inputs(model, record_block, captured) if record_block
               else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    try:
        with ctx, capture, torch.no_grad(), tqdm(total=len(feats), desc="reference log-probs", unit="pair",
                                                 disable=not progress) as bar:
            for idx in length_batches(lengths, config.ref_batch_size):
                items = [{**feats[i], "label": 0.0, "ref_logp_0": 0.0, "ref_logp_1": 0.0}
                         for i in idx]
                batch = {k: v.to(device) for k, v in collate(items).items()}
                captured.clear()
                lp1, lp0 = pair_logps(model, batch)
                r1[idx], r0[idx] = lp1.double().cpu().numpy(), lp0.double().cpu().numpy()
                bar.update(len(idx))
                if records is not None:
                    recs = _split_block_inputs(batch, captured, items)
                    if not checked and not _runs_from_block(model, record_block, collate, items, recs, lp1, lp0):
                        warnings.warn(f"{type(model).__name__} does not run exactly from a block's "
                                      "input; training without cache_frozen_blocks", stacklevel=2)
                        records = None
                        continue
                    checked = True
                    for i, r in zip(idx, recs):
                        records[i] = r
    finally:
        model.train(was_training)
    return (r0, r1, records) if record_block else (r0, r1)


def _split_block_inputs(batch, captured: list, items: list[dict]) -> list[dict]:
    """Per pair, the recorded inputs of the lowest adapted block (unpadded, CPU), from the
    one (concatenated layout) or two (shared prompt: prompts, then responses) tensors one
    `pair_logps` call recorded."""
    keep = lambda h: h.detach().cpu().clone()  # noqa: E731  (a slice would pin the batch)
    out = []
    if "prompt_input_ids" in batch:
        prompts, responses = captured
        P = prompts.shape[1]
        for i, it in enumerate(items):
            prompt = keep(prompts[i, P - len(it["prompt_ids_1"]):])
            out.append({"block_input_prompt_1": prompt, "block_input_prompt_0": prompt,
                        "block_input_response_1": keep(responses[2 * i, :len(it["response_ids_1"])]),
                        "block_input_response_0": keep(responses[2 * i + 1, :len(it["response_ids_0"])])})
        return out
    (seqs,) = captured
    for i, it in enumerate(items):
        rec = {}
        for j, row in ((1, i), (0, len(items) + i)):
            n_p, n_r = len(it[f"prompt_ids_{j}"]), len(it[f"response_ids_{j}"])
            rec[f"block_input_prompt_{j}"] = keep(seqs[row, :n_p])
            rec[f"block_input_response_{j}"] = keep(seqs[row, n_p:n_p + n_r])
        out.append(rec)
    return out


def _runs_from_block(model, block: int, collate, items, recs, lp1, lp0, atol: float = 1e-3) -> bool:
    """Whether `model` run `from_block(block)` on the recorded inputs gives the log-probs
    `lp1`, `lp0` of the full forward (shape (B,)) for this batch."""
    device = lp1.device
    batch = {k: v.to(device) for k, v in collate([{**it, **r} for it, r in zip(items, recs)]).items()}
    with from_block(model, block):
        c1, c0 = pair_logps(model, batch)
    return bool(max((c1 - lp1).abs().max(), (c0 - lp0).abs().max()) <= atol)


