"""Pooled features: equal to an unbatched forward pass, whatever the batching and padding."""
import numpy as np
import pytest
import torch

from dualign.models.features import (cached_features, lookup_features, pooled_features, row_keys,
                                     settings_key, store_features)
from dualign.models.text import encode_pairs

PROMPTS = ["Hi there", "How do I boil an egg for exactly the right time?", "x", "Why is the sky blue?"]
RESPONSES = ["Hello!", "Six minutes.", "A much longer answer that pads the others quite a bit more.", ""]


def _manual(model, tok, pooling):
    rows = []
    for (p, r) in encode_pairs(tok, PROMPTS, RESPONSES, max_length=512):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            h = model.base_model(input_ids=ids).last_hidden_state[0]
        rows.append(h[-1] if pooling == "last" else h[len(p):].mean(0))
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_matches_unbatched_forward(tiny_model, tiny_tokenizer, pooling):
    want = _manual(tiny_model, tiny_tokenizer, pooling)
    for bs in (1, 3, 8):
        got = pooled_features(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, pooling=pooling, batch_size=bs)
        assert got.shape == (4, tiny_model.config.hidden_size) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_pooling_differs_and_bad_input(tiny_model, tiny_tokenizer):
    a = pooled_features(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, pooling="last")
    b = pooled_features(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, pooling="mean")
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="pooling"):
        pooled_features(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, pooling="max")
    with pytest.raises(ValueError, match="responses"):
        pooled_features(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES[:2])
    assert pooled_features(tiny_model, tiny_tokenizer, [], []).shape == (0, tiny_model.config.hidden_size)


def test_cache_roundtrip_and_incremental(tmp_path, tiny_model, tiny_tokenizer):
    loaded = (tiny_model, tiny_tokenizer)
    full = pooled_features(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES)
    x, _ = cached_features("tiny", PROMPTS[:2], RESPONSES[:2], cache_dir=tmp_path, loaded=loaded, progress=False)
    np.testing.assert_allclose(x, full[:2], atol=2e-5)
    # a superset computes only the two new pairs: one more chunk, holding two rows
    y, _ = cached_features("tiny", PROMPTS, RESPONSES, cache_dir=tmp_path, loaded=loaded, progress=False)
    np.testing.assert_allclose(y, full, atol=2e-5)
    chunks = sorted((tmp_path / settings_key("tiny", "last", None, 512)).glob("*.safetensors"))
    assert len(chunks) == 2
    from safetensors import safe_open
    sizes = []
    for c in chunks:
        with safe_open(str(c), framework="np") as fh:
            sizes.append(fh.get_tensor("features").shape[0])
    assert sizes == [2, 2]
    assert len(lookup_features(chunks[0].parent, row_keys(PROMPTS, RESPONSES))) == 4
    # a full hit needs no backbone at all, and returns the cached rows exactly, in order
    z, l2 = cached_features("tiny", PROMPTS[::-1], RESPONSES[::-1], cache_dir=tmp_path, loaded=None, progress=False)
    assert l2 is None and np.array_equal(z, y[::-1])
    # other settings are another cache
    assert settings_key("tiny", "mean", None, 512) != settings_key("tiny", "last", None, 512)
    with pytest.raises(ValueError):
        store_features("tiny", PROMPTS, RESPONSES, full[:2], cache_dir=tmp_path)
