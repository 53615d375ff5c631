"""Sequence log-probs: exact against a one-pair-at-a-time hand computation, whatever the
batch size and padding side."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dualign.models.logprobs import length_batches, logprobs
from dualign.models.text import encode_pairs

PROMPTS = ["Hi", "How do I bake bread at home?", "x", "Tell me a story about a cat.", "Why?",
           "What is 2+2?", "A much longer prompt that goes on and on, to force padding."]
RESPONSES = ["Hello there.", "Mix flour, water and yeast.", "", "Once upon a time.", "Because.",
             "4", "ok"]


def _reference(model, tok, prompts, responses, template=None):
    """log π(y|x) one pair at a time, no padding, from the raw logits (the hand computation)."""
    out = []
    for p_ids, r_ids in encode_pairs(tok, prompts, responses, template=template):
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            lsm = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        out.append(sum(lsm[len(p_ids) + j - 1, t].item() for j, t in enumerate(r_ids)))
    return np.array(out)


def test_matches_one_by_one_any_batch_and_padding(tiny_model, tiny_tokenizer):
    ref = _reference(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES)
    for bs in (1, 2, 3, 7):
        for side in ("right", "left"):
            lp, n = logprobs(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, batch_size=bs,
                             padding_side=side)
            np.testing.assert_allclose(lp, ref, atol=1e-4, rtol=0)
    # byte-level tokenizer: one token per byte, plus EOS
    np.testing.assert_array_equal(n, [len(r.encode()) + 1 for r in RESPONSES])
    assert np.all(lp < 0)


def test_token_budget_and_template(tiny_model, tiny_tokenizer):
    t = "Q: {prompt}\nA:"
    ref = _reference(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, template=t)
    lp, _ = logprobs(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, batch_size=8,
                     max_batch_tokens=60, template=t)
    np.testing.assert_allclose(lp, ref, atol=1e-4, rtol=0)
    # a different template is a different conditional: the numbers must move
    lp2, _ = logprobs(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES)
    assert np.abs(lp2 - lp).max() > 1e-3


def test_without_eos_drops_the_stop_token(tiny_model, tiny_tokenizer):
    lp_eos, n_eos = logprobs(tiny_model, tiny_tokenizer, PROMPTS[:2], RESPONSES[:2])
    lp, n = logprobs(tiny_model, tiny_tokenizer, PROMPTS[:2], RESPONSES[:2], append_eos=False)
    np.testing.assert_array_equal(n, n_eos - 1)
    assert np.all(lp > lp_eos)  # one fewer (negative) term


def test_length_batches_cover_each_index_once():
    lengths = [5, 1, 9, 9, 3, 7, 2]
    b = length_batches(lengths, 3)
    assert sorted(i for x in b for i in x) == list(range(7))
    assert all(len(x) <= 3 for x in b)
    assert b[0][0] == 2  # longest first
    b = length_batches(lengths, 10, max_batch_tokens=18)
    assert all(len(x) * max(lengths[i] for i in x) <= 18 or len(x) == 1 for x in b)


def test_mismatched_lengths_raise(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError):
        logprobs(tiny_model, tiny_tokenizer, ["a", "b"], ["c"])


def test_append_eos_per_row(tiny_model, tiny_tokenizer):
    """Truncated samples (no EOS emitted) are scored without EOS, the others with it."""
    flags = [True, False, True, False, True, True, False]
    with_eos, n_with = logprobs(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, batch_size=3)
    without, n_without = logprobs(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, batch_size=3, append_eos=False)
    mixed, n_mixed = logprobs(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, batch_size=3, append_eos=flags)
    f = np.array(flags)
    np.testing.assert_allclose(mixed, np.where(f, with_eos, without), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(n_mixed, np.where(f, n_with, n_without))


def test_truncated_samples_are_scored_without_eos():
    import pandas as pd

    from dualign.models.logprobs import samples_append_eos

    df = pd.DataFrame({"truncated": [False, True, False]})
    assert samples_append_eos(df).tolist() == [True, False, True]
    assert samples_append_eos(df, append_eos=False) is False
    assert samples_append_eos(pd.DataFrame({"response": ["a"]})) is True
