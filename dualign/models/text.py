"""How a (prompt, response) pair becomes tokens, and how its log-probability is read off logits.

Every stage that touches a language model (sampling, log-probs, score models, training)
goes through these few functions, so a response is tokenized the same way everywhere.
"""
from __future__ import annotations

from typing import Sequence

# The template of safe-rlhf / the beaver models and PKU-SafeRLHF, used when a tokenizer has
# no chat template of its own.
PKU_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


def pad_id(tokenizer) -> int:
    """The token id padding is filled with: the tokenizer's pad token, else its EOS token, else 0.

    Padded positions are always masked out (attention mask, loss mask), so the id only has to be
    a valid one; one rule everywhere keeps batches of the same rows byte-identical across stages.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


def pad_pairs(pairs, pad_id: int, padding_side: str = "right"):
    """Concatenate (prompt_ids, response_ids) pairs into one padded batch: the one padding
    helper of every stage (sampling's prompts, log-probs, score models, the training collator).

    Parameters
    ----------
    pairs : list of (list[int], list[int])
        Prompt and response token ids per row (from `encode_pairs`).
    pad_id : int
        Token id placed at padded positions (masked out; its value does not matter).
    padding_side : {"right", "left"}

    Returns
    -------
    input_ids, attention_mask, position_ids, response_mask : torch.LongTensor, shape (B, T)
        `position_ids` count real tokens only, so a left-padded row sees the same positions
        as the unpadded row; `response_mask` is 1 on response tokens.
    """
    import torch

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    T = max(len(p) + len(r) for p, r in pairs)
    B = len(pairs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    resp = torch.zeros((B, T), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        s = 0 if padding_side == "right" else T - n
        ids[i, s:s + n] = torch.tensor(p + r, dtype=torch.long)
        att[i, s:s + n] = 1
        resp[i, s + len(p):s + n] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return ids, att, pos, resp


def format_prompt(tokenizer, prompt: str, template: str | None = None) -> str:
    """The text the model sees before its answer.

    `template` (with a `{prompt}` slot) wins when given; otherwise the tokenizer's chat
    template is applied (one user turn, generation prompt added); otherwise PKU_TEMPLATE.
    """
    if template is not None:
        return template.format(prompt=prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
    return PKU_TEMPLATE.format(prompt=prompt)


def encode_prompt(tokenizer, prompt: str, template: str | None = None) -> list[int]:
    """Token ids of the formatted prompt. A BOS token is prepended when the tokenizer uses one
    and the formatted text does not already start with it."""
    text = format_prompt(tokenizer, prompt, template)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if (bos is not None and getattr(tokenizer, "add_bos_token", False)
            and (not ids or ids[0] != bos)):
        ids = [bos] + ids
    return ids


def encode_response(tokenizer, response: str, append_eos: bool = True) -> list[int]:
    """Token ids of a response, tokenized on its own (as TRL does) and ended by EOS."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if append_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str],
                 template: str | None = None, append_eos: bool = True,
                 max_length: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) per pair. With `max_length`, the response is cut first, then
    the prompt from the left, so the answer's start is always kept."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    out = []
    for p, r in zip(prompts, responses):
        pi, ri = encode_prompt(tokenizer, p, template), encode_response(tokenizer, r, append_eos)
        if max_length is not None and len(pi) + len(ri) > max_length:
            ri = ri[: max(1, max_length - min(len(pi), max_length // 2))]
            pi = pi[-(max_length - len(ri)):]
        out.append((pi, ri))
    return out


def response_logps(logits, input_ids, response_mask):
    """Sum of log π(token) over response tokens, per row.

    Parameters
    ----------
    logits : torch.Tensor, shape (B, T, V)
    input_ids : torch.LongTensor, shape (B, T)
    response_mask : torch.Tensor, shape (B, T)
        1 where the token at that position belongs to the response (it is *predicted*
        by the logits one position earlier), 0 for prompt and padding.

    Returns
    -------
    torch.Tensor, shape (B,), float32 sums of log-probabilities (nats).
    """
    import torch

    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):  # sums of log-probs need fp32 at least
        logits = logits.float()
    targets = input_ids[:, 1:]
    mask = response_mask[:, 1:].to(logits.dtype)
    # log_softmax then gather, without materializing a second (B, T, V) tensor of probs
    token_logp = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logp * mask).sum(-1)
