"""The preference trainer: masking/padding, reference log-probs once, resume, saving, config."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import dualign.models.logprobs as logprobs_module
from conftest import make_tiny_llama
from dualign.errors import InputError
from dualign.models.text import encode_pairs, response_logps
from dualign.train import PreferenceConfig, hard_labels, load_trained, train_preferences
from dualign.train import preference
from dualign.train.preference import (PreferenceCollator, preference_trainer_class,
                                      tokenize_pairs)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n=10, seed=0):
    rng = np.random.default_rng(seed)
    words = ["yes", "no", "maybe", "the sky is blue", "I can't help with that", "sure, here:",
             "a much longer answer that goes on and on", "ok", "never", "fine then"]
    prompts = ["hi", "what is two plus two?", "tell me a story about a dragon", "why?"]
    return pd.DataFrame({
        "prompt": [prompts[i % len(prompts)] for i in range(n)],
        "response_0": [words[i % len(words)] for i in range(n)],
        "response_1": [words[(3 * i + 1) % len(words)] for i in range(n)],
        "label": rng.uniform(0, 1, n)})


def _spy_reference(monkeypatch):
    """Count calls of the real `reference_logps` (each goes through unchanged); records the
    number of pairs scored per call."""
    calls = []
    real = preference.reference_logps

    def counting(model, tokenizer, pairs, *a, **k):
        calls.append(len(pairs))
        return real(model, tokenizer, pairs, *a, **k)

    monkeypatch.setattr(preference, "reference_logps", counting)
    return calls


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("share_prompt", [False, True], ids=["concatenated", "shared-prompt"])
def test_policy_logps_equal_one_by_one_response_logps(tiny_tokenizer, tmp_path, share_prompt):
    """Padding and prompt masking: log-probs from a padded batch (concatenated y1/y0 rows with
    logits kept from the first response position; or prompts once, left-padded, with their
    cache reused by both responses) equal each pair run alone, and so do the gradients."""
    tok = tiny_tokenizer
    model = make_tiny_llama(len(tok), seed=0)
    pairs = _pairs(5)
    # max_length 40 truncates some pairs (prompts then differ between y0 and y1, which the
    # shared layout cannot take); 512 truncates nothing
    max_length = 512 if share_prompt else 40
    cfg = PreferenceConfig(output_dir=str(tmp_path), use_lora=False, max_length=max_length,
                           template="Q: {prompt}\nA:")
    feats = tokenize_pairs(tok, pairs, cfg)
    lengths = [len(f["prompt_ids_0"]) + len(f["response_ids_0"]) for f in feats]
    assert len(set(lengths)) > 2  # really different lengths: padding is exercised
    assert len({len(f["prompt_ids_1"]) for f in feats}) > 2  # prompts of different lengths too
    items = [{**f, "label": 0.5, "ref_logp_0": 0.0, "ref_logp_1": 0.0} for f in feats]
    batch = PreferenceCollator(tok.pad_token_id, share_prompt=share_prompt)(items)
    assert ("prompt_input_ids" in batch) == share_prompt
    trainer = preference_trainer_class()(model=model, args=cfg.training_arguments(), beta=0.1)
    lp1, lp0 = trainer.policy_logps(model, batch)
    (lp1.sum() - 2 * lp0.sum()).backward()
    batched_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    total = 0.0
    for side, got, w in (("0", lp0, -2.0), ("1", lp1, 1.0)):
        for i, f in enumerate(feats):
            p, r = f[f"prompt_ids_{side}"], f[f"response_ids_{side}"]
            ids = torch.tensor([p + r])
            mask = torch.tensor([[0] * len(p) + [1] * len(r)])
            alone = response_logps(model(input_ids=ids).logits, ids, mask)
            assert got[i].item() == pytest.approx(alone[0].item(), abs=1e-4)
            total = total + w * alone[0]
    total.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(batched_grads[k], p.grad, rtol=1e-4, atol=1e-5)
    # the same tokens as encode_pairs (the tokenization every stage shares), truncated alike
    enc = encode_pairs(tok, pairs["prompt"].tolist(), pairs["response_1"].tolist(),
                       max_length=max_length, template="Q: {prompt}\nA:")
    assert [(f["prompt_ids_1"], f["response_ids_1"]) for f in feats] == enc
    if not share_prompt:
        assert max(len(p) + len(r) for p, r in enc) == 40  # one pair was truncated


def test_reference_logps_computed_once_and_only_policy_runs(tiny_tokenizer, tmp_path, monkeypatch):
    tok = tiny_tokenizer
    model = make_tiny_llama(len(tok), seed=0)
    pairs = _pairs(8)
    calls = _spy_reference(monkeypatch)
    forwards = []  # grad enabled? per forward pass of the underlying model
    model.register_forward_pre_hook(lambda m, a: forwards.append(torch.is_grad_enabled()))
    cfg = PreferenceConfig(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2,
                           per_device_train_batch_size=4, gradient_accumulation_steps=1,
                           learning_rate=1e-3)
    res = train_preferences(model, tok, pairs, cfg, resume=False)
    assert calls == [len(pairs)]  # one pass over all pairs (y0 and y1), before training
    n_ref = forwards.index(True)
    # reference passes (no grad) all come first; then per optimizer step the policy only:
    # one pass over y1 and y0 together, or with the shared-prompt layout (the default) one
    # over the prompts and one over both responses; no reference pass during training
    assert n_ref >= 1 and not any(forwards[:n_ref]) and all(forwards[n_ref:])
    assert len(forwards) - n_ref == 4 * (2 if cfg.share_prompt else 1)
    # the reference log-probs are in input order and equal the shared `logprobs` function's
    # (a different code path: plain padded batches, no prompt sharing)
    with res.model.disable_adapter():
        for side in ("0", "1"):
            direct, _ = logprobs_module.logprobs(res.model, tok, pairs["prompt"].tolist(),
                                                 pairs[f"response_{side}"].tolist())
            np.testing.assert_allclose(getattr(res, f"ref_logp_{side}"), direct, atol=1e-4)

    # Running again in the same directory: the run is finished, nothing is recomputed.
    calls.clear()
    again = train_preferences(make_tiny_llama(len(tok), seed=0), tok, pairs, cfg, resume=True)
    assert again.skipped and calls == []
    for k, v in _state(res.model).items():
        torch.testing.assert_close(_state(again.model)[k], v)


@pytest.mark.parametrize("settings", [{}, {"save_format": "merged"}, {"use_lora": False},
                                      {"lora_last_layers": 1, "cache_frozen_blocks": True}],
                         ids=["lora", "lora-merged", "full", "lora-frozen-blocks"])
def test_training_leaves_the_callers_model_as_it_was(tiny_tokenizer, tmp_path, settings):
    """The model passed in stays π_ref: its logits, weights and mode are the same after training
    and after a rerun that finds the training finished; what comes back is another model,
    trained. With LoRA the returned model holds the caller's very weight tensors (no second
    copy), but for the layers a merge changed."""
    tok = tiny_tokenizer
    model = make_tiny_llama(len(tok), seed=0)
    ids = torch.tensor([tok("Q: what is two plus two?\nA: four, I think")["input_ids"]])

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits

    before, weights = logits(model), _state(model)
    cfg = PreferenceConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                           learning_rate=5e-2, template="Q: {prompt}\nA:", **settings)
    trained = train_preferences(model, tok, _pairs(6), cfg, resume=False)
    finished = train_preferences(model, tok, _pairs(6), cfg, resume=True)
    assert finished.skipped and not hasattr(model, "peft_config") and not model.training
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    for res in (trained, finished):
        assert res.model is not model
        assert (logits(res.model) - before).abs().max() > 1e-3  # trained: it moved away from π_ref
    torch.testing.assert_close(logits(finished.model), logits(trained.model), rtol=1e-5, atol=1e-6)
    if settings.get("use_lora", True):
        shared = {p.data_ptr() for p in model.parameters()}
        own = [n for n, p in trained.model.named_parameters() if p.data_ptr() not in shared]
        if settings.get("save_format") == "merged":  # the merged layers hold their own weights
            assert own and all("proj" in n for n in own)
            assert trained.model.model.embed_tokens.weight is model.model.embed_tokens.weight
        else:  # only the adapter is new; every other tensor is π_ref's
            assert own and all("lora_" in n for n in own)
            assert {p.data_ptr() for n, p in finished.model.named_parameters() if "lora_" not in n} <= shared


class _KillAt:
    """A TrainerCallback that kills the run (raises) when `global_step` reaches `step`."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == step:
                    raise KeyboardInterrupt(f"killed at step {step}")

        return Kill()


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_resume_after_kill_gives_identical_weights(tiny_tokenizer, tmp_path, monkeypatch, use_lora):
    tok = tiny_tokenizer
    pairs = _pairs(10)
    # 10 pairs, 2 × 2 accumulation: 3 steps per epoch (the last one short), 7 steps = 3 epochs;
    # dropout on, so the restored RNG state matters too.
    common = dict(max_steps=7, save_steps=2, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, learning_rate=5e-3, use_lora=use_lora,
                  lora_dropout=0.1, lr_scheduler_type="linear", seed=7, save_total_limit=None)
    full = train_preferences(make_tiny_llama(len(tok), seed=0), tok, pairs,
                             PreferenceConfig(output_dir=str(tmp_path / "a"), **common), resume=False)

    cfg_b = PreferenceConfig(output_dir=str(tmp_path / "b"), **common)
    with pytest.raises(KeyboardInterrupt):
        train_preferences(make_tiny_llama(len(tok), seed=0), tok, pairs, cfg_b, resume=False,
                          callbacks=[_KillAt(5)])
    assert (tmp_path / "b" / "checkpoint-4").is_dir() and not (tmp_path / "b" / "model").exists()

    calls = _spy_reference(monkeypatch)
    resumed = train_preferences(make_tiny_llama(len(tok), seed=0), tok, pairs, cfg_b, resume=True)
    assert resumed.resumed_from.endswith("checkpoint-4")
    assert calls == []  # reference log-probs came from the run directory's cache
    assert resumed.global_step == full.global_step == 7

    a, b = _state(full.model), _state(resumed.model)
    assert a.keys() == b.keys()
    init = _state(make_tiny_llama(len(tok), seed=0))
    moved = False
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
        base_key = k.replace("base_model.model.", "").replace(".base_layer", "")
        if base_key in init and init[base_key].shape == a[k].shape:
            moved |= not torch.allclose(a[k], init[base_key])
        else:
            moved |= "lora_B" in k and bool(a[k].abs().max() > 0)
    assert moved, "training changed nothing: the comparison would be vacuous"


def test_resume_refuses_a_different_run(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    cfg = PreferenceConfig(output_dir=str(tmp_path), max_steps=1, save_steps=1,
                           per_device_train_batch_size=4)
    train_preferences(make_tiny_llama(len(tok)), tok, _pairs(4), cfg, resume=False)
    other = PreferenceConfig(**{**cfg.to_dict(), "learning_rate": 1.0})
    with pytest.raises(InputError, match="other data, settings or base model"):
        train_preferences(make_tiny_llama(len(tok)), tok, _pairs(4), other, resume=True)
    # resume=False starts over in the same directory
    res = train_preferences(make_tiny_llama(len(tok)), tok, _pairs(4), other, resume=False)
    assert res.global_step == 1 and not res.skipped
    # "auto" (the pipelines): the finished same run is reused, another one is started over
    res = train_preferences(make_tiny_llama(len(tok)), tok, _pairs(4), other, resume="auto")
    assert res.skipped
    res = train_preferences(make_tiny_llama(len(tok)), tok, _pairs(4), cfg, resume="auto")
    assert res.global_step == 1 and not res.skipped
    with pytest.raises(ValueError, match="resume must be"):
        train_preferences(make_tiny_llama(len(tok)), tok, _pairs(4), cfg, resume="yes")


def test_hard_label_mode_trains_on_seeded_draws(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    pairs = _pairs(12)
    cfg = PreferenceConfig(output_dir=str(tmp_path), label_mode="hard", seed=5, max_steps=1,
                           per_device_train_batch_size=4)
    res = train_preferences(make_tiny_llama(len(tok)), tok, pairs, cfg, resume=False)
    np.testing.assert_array_equal(res.labels, hard_labels(pairs["label"].to_numpy(), seed=5))


def test_saved_model_loads_back_with_a_card(tiny_tokenizer, tmp_path):
    """Adapter and merged saves reload to the trained policy; the card records β, λ*, margins."""
    tok = tiny_tokenizer
    pairs = _pairs(6)
    meta = {"lambda": [0.73], "margins": [0.5], "data": "demo pairs (6)",
            "scores": ["reward", "safety/cost"], "method": "MoCAN"}
    probe_p, probe_r = pairs["prompt"].tolist(), pairs["response_1"].tolist()
    for fmt in ("adapter", "merged"):
        cfg = PreferenceConfig(output_dir=str(tmp_path / fmt), max_steps=3, save_steps=10,
                               per_device_train_batch_size=3, learning_rate=1e-2, save_format=fmt,
                               beta=0.25)
        res = train_preferences(make_tiny_llama(len(tok)), tok, pairs, cfg, resume=False, metadata=meta)
        files = sorted(p.name for p in res.model_dir.iterdir())
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
        assert ("adapter_model.safetensors" in files) == (fmt == "adapter")
        assert ("model.safetensors" in files) == (fmt == "merged")
        card = (res.model_dir / "README.md").read_text()
        for needle in ("| β | 0.25 |", "| λ* | [0.73] |", "| margins | [0.5] |", "demo pairs (6)",
                       "safety/cost", "MoCAN"):
            assert needle in card, needle
        info = json.loads((res.model_dir / "dualign_train.json").read_text())
        assert info["config"]["beta"] == 0.25 and info["metadata"]["lambda"] == [0.73]

        trained, _ = logprobs_module.logprobs(res.model, tok, probe_p, probe_r)
        loaded, tok2 = load_trained(res.model_dir, base_model=make_tiny_llama(len(tok)))
        again, _ = logprobs_module.logprobs(loaded, tok2, probe_p, probe_r)
        base, _ = logprobs_module.logprobs(make_tiny_llama(len(tok)), tok, probe_p, probe_r)
        np.testing.assert_allclose(again, trained, atol=1e-4)
        assert np.abs(trained - base).max() > 1e-3  # training moved the policy


def test_config_maps_to_yaml_and_rejects_unknown_keys():
    cfg = PreferenceConfig.from_dict({"beta": 0.2, "lora_r": 4, "max_steps": 10})
    assert PreferenceConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match="lr"):
        PreferenceConfig.from_dict({"lr": 1e-4})
    with pytest.raises(InputError, match="label_mode"):
        PreferenceConfig(label_mode="fuzzy")
    with pytest.raises(InputError, match="beta"):
        PreferenceConfig(beta=0)
    args = PreferenceConfig(output_dir="x", gradient_accumulation_steps=3, report_to="none",
                            learning_rate=2e-5).training_arguments()
    assert args.gradient_accumulation_steps == 3 and args.learning_rate == 2e-5



def test_a_float_written_as_yaml_reads_it_is_a_number():
    """PyYAML reads `learning_rate: 5e-4` (and `--train.learning_rate 5e-4`) as the string
    "5e-4": the settings take the number, and a word is a one-line error naming the key."""
    import yaml

    assert yaml.safe_load("5e-4") == "5e-4"  # the YAML 1.1 quirk this guards against
    cfg = PreferenceConfig.from_dict(yaml.safe_load("learning_rate: 5e-4\nsft_weight: 1e0\nmax_steps: 3"))
    assert cfg.learning_rate == 5e-4 and cfg.sft_weight == 1.0 and cfg.max_steps == 3
    with pytest.raises(InputError, match="expected a number, got 'fast'") as e:
        PreferenceConfig.from_dict({"learning_rate": "fast"})
    assert e.value.field == "train.learning_rate"


def test_bad_pairs_raise_input_error(tiny_tokenizer, tmp_path):
    cfg = PreferenceConfig(output_dir=str(tmp_path), max_steps=1)
    model = make_tiny_llama(len(tiny_tokenizer))
    bad = _pairs(3).drop(columns=["label"])
    with pytest.raises(InputError, match="label"):
        train_preferences(model, tiny_tokenizer, bad, cfg)
    bad = _pairs(3).assign(label=[0.2, 1.5, 0.1])
    with pytest.raises(InputError, match="record 1"):
        train_preferences(model, tiny_tokenizer, bad, cfg)


@pytest.mark.parametrize("share_prompt", [False, True], ids=["concatenated", "shared-prompt"])
def test_sft_term_is_the_label_weighted_per_token_nll(tiny_tokenizer, tmp_path, share_prompt):
    """sft_weight α adds α · mean[p · NLL(y1) + (1 − p) · NLL(y0)] (per-token NLL), and the
    response lengths are read correctly from either batch layout."""
    tok = tiny_tokenizer
    model = make_tiny_llama(len(tok), seed=0)
    pairs = _pairs(6)
    cfg = PreferenceConfig(output_dir=str(tmp_path), use_lora=False, template="Q: {prompt}\nA:")
    feats = tokenize_pairs(tok, pairs, cfg)
    items = [{**f, "label": float(p), "ref_logp_0": -3.0, "ref_logp_1": -2.0}
             for f, p in zip(feats, pairs["label"])]
    batch = PreferenceCollator(tok.pad_token_id, share_prompt=share_prompt)(items)
    n1, n0 = preference.response_lengths(batch)
    assert n1.tolist() == [len(f["response_ids_1"]) for f in feats]
    assert n0.tolist() == [len(f["response_ids_0"]) for f in feats]
    plain = preference_trainer_class()(model=model, args=cfg.training_arguments(), beta=0.1)
    with_sft = preference_trainer_class()(model=model, args=cfg.training_arguments(), beta=0.1, sft_weight=0.5)
    with torch.no_grad():
        lp1, lp0 = plain.policy_logps(model, batch)
        p = torch.tensor(pairs["label"].to_numpy(), dtype=torch.float32)
        want = np.mean([-(pi * a / len(f["response_ids_1"]) + (1 - pi) * b / len(f["response_ids_0"]))
                        for pi, a, b, f in zip(p.tolist(), lp1.tolist(), lp0.tolist(), feats)])
        diff = with_sft.compute_loss(model, batch) - plain.compute_loss(model, batch)
    assert diff.item() == pytest.approx(0.5 * want, rel=1e-5)
    with pytest.raises(InputError, match="sft_weight"):
        PreferenceConfig(sft_weight=-1)


def test_lora_last_layers_adapts_only_the_top_blocks_and_stops_backprop_there(tiny_tokenizer):
    """An adapter on the last block only: no LoRA weight below it, and the lower block's
    output is not part of the autograd graph (backward never runs through it)."""
    model = make_tiny_llama(len(tiny_tokenizer))
    adapted = preference._add_lora(model, PreferenceConfig(lora_last_layers=1))
    lora = [n for n, p in adapted.named_parameters() if "lora_" in n]
    assert lora and all(".layers.1." in n for n in lora)
    tracked = {}
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda m, a, out, i=i: tracked.__setitem__(
            i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    ids = torch.tensor([[5, 6, 7, 8]])
    adapted(input_ids=ids).logits.sum().backward()
    assert tracked == {0: False, 1: True}
    assert all(p.grad is not None for n, p in adapted.named_parameters() if "lora_" in n)
    with pytest.raises(InputError, match="2 transformer blocks"):
        preference._add_lora(make_tiny_llama(len(tiny_tokenizer)), PreferenceConfig(lora_last_layers=3))
    with pytest.raises(InputError, match="no module matching"):
        preference._add_lora(make_tiny_llama(len(tiny_tokenizer)),
                             PreferenceConfig(lora_last_layers=1, lora_target_modules=["nope"]))
    with pytest.raises(InputError, match="lora_last_layers"):
        PreferenceConfig(lora_last_layers=-1)


def test_max_response_length_cuts_responses_not_prompts(tiny_tokenizer):
    pairs = _pairs(6)
    full = tokenize_pairs(tiny_tokenizer, pairs, PreferenceConfig())
    cut = tokenize_pairs(tiny_tokenizer, pairs, PreferenceConfig(max_response_length=2))
    for f, c in zip(full, cut):
        for k in ("0", "1"):
            assert c[f"prompt_ids_{k}"] == f[f"prompt_ids_{k}"]
            assert c[f"response_ids_{k}"] == f[f"response_ids_{k}"][:2]
    with pytest.raises(InputError, match="max_response_length"):
        PreferenceConfig(max_response_length=-1)


@pytest.mark.parametrize("max_length", [512, 40], ids=["shared-prompt", "truncated-concatenated"])
def test_cache_frozen_blocks_trains_the_same_model_and_runs_lower_blocks_once(tiny_tokenizer, tmp_path,
                                                                              max_length):
    """Training from the recorded output of the frozen lower block gives the weights and losses
    of the full forward (both batch layouts: max_length 40 truncates some prompts differently
    for y0 and y1, so their batches are concatenated), and the frozen block runs in the
    reference pass only."""
    tok = tiny_tokenizer
    pairs = _pairs(10)
    common = dict(max_steps=5, save_steps=2, per_device_train_batch_size=2, learning_rate=5e-3,
                  lora_last_layers=1, max_length=max_length, seed=3, template="Q: {prompt}\nA:")
    plain = train_preferences(make_tiny_llama(len(tok), seed=0), tok, pairs,
                              PreferenceConfig(output_dir=str(tmp_path / "plain"), **common), resume=False)
    model = make_tiny_llama(len(tok), seed=0)
    grad_modes = []  # one entry per forward of the frozen block 0: grad enabled?
    model.model.layers[0].register_forward_pre_hook(lambda m, a: grad_modes.append(torch.is_grad_enabled()))
    cached = train_preferences(model, tok, pairs, PreferenceConfig(
        output_dir=str(tmp_path / "cached"), cache_frozen_blocks=True, **common), resume=False)
    assert grad_modes and not any(grad_modes)  # reference pass (no grad) only, never in a training step
    np.testing.assert_allclose(cached.ref_logp_1, plain.ref_logp_1, atol=1e-5)
    losses = lambda r: [h["loss"] for h in r.log_history if "loss" in h]  # noqa: E731
    np.testing.assert_allclose(losses(cached), losses(plain), rtol=1e-4)
    a, b = _state(plain.model), _state(cached.model)
    assert any("lora_B" in k and a[k].abs().max() > 0 for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    # the block list and cache indices are the model's own again after training
    assert len(cached.model.get_base_model().model.layers) == 2
    assert cached.model.get_base_model().model.layers[1].self_attn.layer_idx == 1


def test_cache_frozen_blocks_falls_back_where_the_model_does_not_run_from_a_block(tiny_tokenizer, tmp_path):
    """GPT-2 adds learned positions to `inputs_embeds`: running it from a block's recorded
    input is not exact, the first batch shows it, and training goes on without the cache."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    cfg = PreferenceConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                           lora_last_layers=1, cache_frozen_blocks=True, lora_target_modules=["c_attn"])
    with pytest.warns(UserWarning, match="does not run exactly from a block"):
        res = train_preferences(model, tok, _pairs(4), cfg, resume=False)
    assert res.global_step == 2


def test_cache_frozen_blocks_needs_frozen_blocks():
    with pytest.raises(InputError, match="cache_frozen_blocks"):
        PreferenceConfig(cache_frozen_blocks=True)
    with pytest.raises(InputError, match="cache_frozen_blocks"):
        PreferenceConfig(cache_frozen_blocks=True, lora_last_layers=1, use_lora=False)
    with pytest.raises(InputError, match="cache_frozen_blocks"):
        PreferenceConfig(cache_frozen_blocks=True, lora_last_layers=1, gradient_checkpointing=True)
