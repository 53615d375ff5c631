"""Run a causal LM from the input of one transformer block, so frozen lower blocks run once.

With LoRA on the last N blocks only (`PreferenceConfig.lora_last_layers`), the blocks below
never change during training: their output for a pair is the same at every step and every
epoch, and equal to what the reference pass computes. `PreferenceConfig.cache_frozen_blocks`
records that output once (`capture_block_inputs`, during the reference pass) and trains from
it (`from_block`): a step then runs N blocks forward instead of all of them.

Both work on the model's own forward, not a copy of it: `from_block` lets the model's block
list hold only the top blocks for the duration of a call and feeds the recorded hidden
states as `inputs_embeds`. That is exact for models whose forward does nothing to
`inputs_embeds` before the first block but add rotary positions (Llama, Mistral, Qwen2,
SmolLM2, Phi-3); a model that scales or shifts them (Gemma, GPT-2's learned positions)
would not be, so the trainer checks the first batch against the full forward and trains
without the cache when they differ (`check_from_block`).
"""
from __future__ import annotations

import contextlib


def transformer_blocks(model):
    """The module that owns the model's list of transformer blocks, and the attribute name.

    Returns
    -------
    (torch.nn.Module, str)
        `getattr(owner, name)` is a `torch.nn.ModuleList` of `config.num_hidden_layers`
        blocks (through PEFT and other wrappers).

    Raises
    ------
    ValueError
        No such list (the model's blocks are not in a `layers`, `h` or `blocks` list).
    """
    import torch

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        for name in ("layers", "h", "blocks"):
            blocks = getattr(module, name, None)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks) == n:
                return module, name
    raise ValueError(f"no list of {n} transformer blocks found in {type(model).__name__}")


@contextlib.contextmanager
def from_block(model, start: int):
    """Within the block, the model runs blocks `start`.. only: pass the input of block
    `start` as `inputs_embeds` (shape (B, T, hidden)) and the outputs (logits, cache) are the
    full model's. The blocks' cache indices are shifted to 0.. meanwhile (the cache and the
    causal mask size themselves from cache layer 0). Not re-entrant; gradients flow as
    usual (backward runs on the recorded graph, after the block has been left)."""
    owner, name = transformer_blocks(model)
    blocks = getattr(owner, name)
    top = blocks[start:]
    renumbered = [(m, m.layer_idx) for m in top.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    for m, i in renumbered:
        m.layer_idx = i - start
    setattr(owner, name, top)
    try:
        yield
    finally:
        setattr(owner, name, blocks)
        for m, i in renumbered:
            m.layer_idx = i


@contextlib.contextmanager
def capture_block_inputs(model, start: int, store: list):
    """Within the block, every forward call appends the hidden states entering block
    `start` (detached, shape (B, T, hidden)) to `store`, one tensor per call."""
    owner, name = transformer_blocks(model)
    block = getattr(owner, name)[start]

    def hook(_module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        store.append(h.detach())

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()
