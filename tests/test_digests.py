"""One digest scheme (`runio.stream_digest` and its forms), the weights identity of the reference
cache and of a training run's base, and `dualign logprobs` writing the pipelines' own columns."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny_llama
from dualign.errors import InputError
from dualign.runio import array_digest, digest, file_digest, stream_digest
from dualign.train.reference import weights_digest

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the scheme

def test_every_digest_form_is_one_stream(tmp_path):
    """digest, file_digest and array_digest are stream_digest over their parts; an array counts
    by dtype and shape as well as bytes; a JSON object by content, not key order."""
    a = np.arange(6, dtype=np.int32)
    assert array_digest(a) == stream_digest([a])
    assert array_digest(a) != array_digest(a.view(np.float32))  # same bytes, another dtype
    assert array_digest(a) != array_digest(a.reshape(2, 3))  # same bytes, another shape
    assert array_digest(a, a) == stream_digest(iter([a, a]))  # a generator streams the same
    assert digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1}) == \
        stream_digest([json.dumps({"a": [1, 2], "b": 1}, sort_keys=True).encode()])
    f = tmp_path / "f.bin"
    f.write_bytes(bytes(range(256)) * 1000)
    assert file_digest(f) == file_digest(f, chunk=7) == stream_digest([f.read_bytes()])
    assert len(stream_digest([b"x"], 64)) == 64 and stream_digest([b"x"], 64).startswith(stream_digest([b"x"]))


# ----------------------------------------------------------------------------- weights identity

def test_weights_digest_tells_a_merged_lora_layer_from_its_base(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    n = len(tiny_tokenizer)
    base = make_tiny_llama(n, seed=0)
    assert weights_digest(base) == weights_digest(make_tiny_llama(n, seed=0))  # same weights, same identity
    assert weights_digest(base) != weights_digest(make_tiny_llama(n, seed=1))

    # one linear layer in the middle of the model changed by a merged LoRA adapter
    peft = get_peft_model(make_tiny_llama(n, seed=0),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["layers.0.mlp.up_proj"]))
    torch.manual_seed(3)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    merged = peft.merge_and_unload()
    before, after = base.state_dict(), merged.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["model.layers.0.mlp.up_proj.weight"]
    # what the old fingerprint looked at (class, size, first and last tensor) is all unchanged
    first, last = list(base.parameters())[0], list(base.parameters())[-1]
    assert torch.equal(first, list(merged.parameters())[0]) and torch.equal(last, list(merged.parameters())[-1])
    assert weights_digest(merged) != weights_digest(base)

    # any dtype (numpy has no bfloat16): stable, and another dtype is another model
    bf = make_tiny_llama(n, seed=0).to(torch.bfloat16)
    assert weights_digest(bf) == weights_digest(make_tiny_llama(n, seed=0).to(torch.bfloat16)) != weights_digest(base)


def test_reference_cache_is_not_reused_for_a_model_changed_in_one_layer(tiny_tokenizer, tmp_path, monkeypatch):
    """The reference log-prob cache in an output folder is keyed by every weight: a model that
    differs from the cached one in one inner layer gets its own reference pass."""
    from dualign.train import PreferenceConfig, preference

    tok, n = tiny_tokenizer, len(tiny_tokenizer)
    pairs = pd.DataFrame({"prompt": ["hi", "why?"], "response_0": ["no", "ok"], "response_1": ["yes", "fine"],
                          "label": [0.3, 0.8]})
    cfg = PreferenceConfig(output_dir=str(tmp_path), max_steps=1)
    feats = preference.tokenize_pairs(tok, pairs, cfg)
    tdig = preference._tokens_digest(feats)
    base = make_tiny_llama(n, seed=0)
    r0, r1, _, _ = preference._cached_reference_logps(base, tok, pairs, cfg, feats, tdig, tmp_path)
    calls = []
    real = preference.reference_logps
    monkeypatch.setattr(preference, "reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = preference._cached_reference_logps(make_tiny_llama(n, seed=0), tok, pairs, cfg, feats, tdig, tmp_path)
    assert calls == [] and np.array_equal(again[0], r0)  # same weights: from the cache

    other = make_tiny_llama(n, seed=0)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(0.5)
    got = preference._cached_reference_logps(other, tok, pairs, cfg, feats, tdig, tmp_path)
    assert calls == [1] and not np.allclose(got[0], r0)


# ----------------------------------------------------------------------------- a training run's base

PROMPTS = ["hello there", "how do I bake bread?"]


def _pd_run(tok, out, seed, resume=True):
    from dualign.models.scorers import CallableScorer
    from dualign.train.primal_dual import PrimalDualConfig, train_primal_dual
    import toy_scorers

    cfg = PrimalDualConfig(safety_target=0.0, max_steps=1, num_generations=2, per_device_train_batch_size=4,
                           max_new_tokens=4, lora_r=2, lora_alpha=4, save_steps=1, template="Q: {prompt}\nA:")
    return train_primal_dual(make_tiny_llama(len(tok), seed=seed), tok, PROMPTS, CallableScorer(toy_scorers.reward),
                             {"vowels": CallableScorer(toy_scorers.safety)}, cfg, out_dir=out, resume=resume)


def test_primal_dual_resume_tells_another_base(tiny_tokenizer, tmp_path):
    from dualign.train.primal_dual import RUN_FILE

    tok = tiny_tokenizer
    first = _pd_run(tok, tmp_path, seed=0)
    assert not first.skipped and first.global_step == 1
    record = json.loads((tmp_path / RUN_FILE).read_text())
    assert record["base_weights"] == weights_digest(make_tiny_llama(len(tok), seed=0))
    with pytest.raises(InputError, match="another base policy"):
        _pd_run(tok, tmp_path, seed=1)
    assert _pd_run(tok, tmp_path, seed=0).skipped  # the same base: the finished run
    # a folder written before the base was recorded still resumes (its run digest is unchanged)
    del record["base_weights"]
    (tmp_path / RUN_FILE).write_text(json.dumps(record))
    assert _pd_run(tok, tmp_path, seed=0).skipped


def test_preference_resume_tells_another_base(tiny_tokenizer, tmp_path):
    """What `train_preferences`' docs promise for a folder holding another run, when only the
    base model differs: resume=True refuses, "auto" starts over."""
    from dualign.train import PreferenceConfig, train_preferences

    tok = tiny_tokenizer
    pairs = pd.DataFrame({"prompt": ["hi", "why?", "hi", "why?"], "response_0": ["no", "ok", "never", "sure"],
                          "response_1": ["yes", "fine", "maybe", "no"], "label": [0.3, 0.8, 0.5, 0.9]})
    cfg = PreferenceConfig(output_dir=str(tmp_path), max_steps=1, save_steps=1, per_device_train_batch_size=4)
    train_preferences(make_tiny_llama(len(tok), seed=0), tok, pairs, cfg, resume=False)
    with pytest.raises(InputError, match="holds a run"):
        train_preferences(make_tiny_llama(len(tok), seed=1), tok, pairs, cfg, resume=True)
    res = train_preferences(make_tiny_llama(len(tok), seed=1), tok, pairs, cfg, resume="auto")
    assert not res.skipped and res.global_step == 1
    assert train_preferences(make_tiny_llama(len(tok), seed=1), tok, pairs, cfg, resume=True).skipped


# ----------------------------------------------------------------------------- dualign logprobs

def test_cli_logprob_column_is_current_for_the_pipeline(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`dualign logprobs --name ref` writes the column PeCAN's `logp/ref` is (same provenance):
    the pipeline's call finds it current and computes nothing; other tokenization does."""
    import dualign.models.logprobs as lp_module
    from dualign.cli import main
    from dualign.pipelines.pecan import logprob_models
    from dualign.pipelines.scoring import logprob_columns
    from dualign.train import PreferenceConfig

    (tmp_path / "p.txt").write_text("hello\nworld\n")
    assert main(["sample", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "p.txt"), "--num-samples", "2",
                 "--max-new-tokens", "5", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    samples, scores = tmp_path / "run" / "samples.parquet", tmp_path / "run" / "scores.parquet"
    assert main(["logprobs", "--model", str(tiny_model_dir), "--samples", str(samples), "--name", "ref",
                 "--no-progress"]) == 0
    stamp, content = scores.stat().st_mtime_ns, scores.read_bytes()

    calls = []
    real = lp_module.logprobs
    monkeypatch.setattr(lp_module, "logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    align = PreferenceConfig()  # PeCAN's tokenization with default training settings
    tokenization = dict(template=align.template, append_eos=align.append_eos, max_length=align.max_length,
                        batch_size=align.ref_batch_size)
    logs = []
    logprob_columns([samples], logprob_models(str(tiny_model_dir), {}), log=logs.append, **tokenization)
    assert calls == [] and scores.stat().st_mtime_ns == stamp and scores.read_bytes() == content
    assert logs == [f"{scores}: logp/ref is up to date"]
    # the CLI again: nothing to do either
    capsys.readouterr()
    assert main(["logprobs", "--model", str(tiny_model_dir), "--samples", str(samples), "--name", "ref"]) == 0
    assert "logp/ref is up to date" in capsys.readouterr().out and calls == []

    # other tokenization is another column: computed, and the values are the ones the CLI wrote
    before = pd.read_parquet(scores)["logp/ref"].to_numpy()
    logprob_columns([samples], logprob_models(str(tiny_model_dir), {}), log=logs.append,
                    **{**tokenization, "max_length": None})
    assert calls == [1]
    np.testing.assert_allclose(pd.read_parquet(scores)["logp/ref"].to_numpy(), before, atol=1e-5)
