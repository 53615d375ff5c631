"""The real embedded SmolLM2-135M-Instruct: load (from the cache after the first conversion),
sample 2 responses to 2 prompts, score their log-probs."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def test_embedded_sample_and_logprobs(tmp_path):
    from dualign.errors import InputError
    from dualign.models.generation import sample
    from dualign.models.loading import EMBEDDED_DEFAULT, embedded_model_dir, load_policy
    from dualign.models.logprobs import logprobs

    try:
        model, tok = load_policy(EMBEDDED_DEFAULT)
    except InputError as e:
        pytest.skip(str(e))
    assert (embedded_model_dir() / "model.safetensors").exists()
    assert tok.chat_template and tok.padding_side == "left"
    prompts = ["What is the capital of France?", "Give me one tip for sleeping better."]
    df = sample(model, tok, prompts, num_samples=2, max_new_tokens=24, seed=0, out_dir=tmp_path,
                model_name=EMBEDDED_DEFAULT, progress=False)
    assert len(df) == 4 and (df["response"].str.len() > 0).all()
    again = sample(model, tok, prompts, num_samples=2, max_new_tokens=24, seed=0, batch_size=1,
                   model_name=EMBEDDED_DEFAULT, progress=False)
    assert again["response"].tolist() == df["response"].tolist()  # batch-independent by row seed
    lp, n = logprobs(model, tok, df["prompt"].tolist(), df["response"].tolist(), batch_size=4)
    lp1, _ = logprobs(model, tok, df["prompt"].tolist(), df["response"].tolist(), batch_size=1)
    np.testing.assert_allclose(lp, lp1, atol=1e-4, rtol=0)
    assert np.all(np.isfinite(lp)) and np.all(lp < 0) and np.all(n > 0)
    # a sensible model: its own sampled answer is likelier than a fixed unrelated one
    other, other_n = logprobs(model, tok, prompts, ["Bananas are yellow and curved fruit."] * 2)
    assert (lp / n).mean() > (other / other_n).mean()
    # greedy answer to a factual question
    g = sample(model, tok, prompts[:1], num_samples=1, max_new_tokens=12, temperature=0, progress=False)
    assert "Paris" in g["response"][0]
