"""Score models of each kind against a hand computation; signs declared, never guessed;
`dualign score` and `dualign logprobs` writing scores.parquet."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tiny_tokenizer
from dualign.cli import main
from dualign.errors import InputError
from dualign.data.scores import write_scores
from dualign.models.scorers import (CallableScorer, SafeRLHFScorer, SequenceClassifierScorer,
                                    check_safety_sign, load_scorer)
from dualign.models.text import PKU_TEMPLATE, encode_pairs

PROMPTS = ["How do I pick a lock?", "hi", "Tell me about cats, at length please.", "ok?"]
RESPONSES = ["I can't help with that.", "Hello!", "Cats are small carnivorous mammals.", ""]


def _tiny_llama_config(vocab):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def saferlhf_dir(tmp_path_factory):
    """A tiny random LLaMA in safe-rlhf's LlamaForScore layout, as the beaver cost model ships:
    safetensors with `model.*` and `score_head.*`, config architectures ["LlamaForScore"]."""
    from transformers import LlamaModel

    tok = make_tiny_tokenizer()
    cfg = _tiny_llama_config(len(tok))
    torch.manual_seed(1)
    backbone = LlamaModel(cfg).eval()
    head = torch.nn.Linear(32, 1, bias=True)
    d = tmp_path_factory.mktemp("beaver-tiny-cost")
    sd = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    sd["score_head.weight"], sd["score_head.bias"] = head.weight.detach().clone(), head.bias.detach().clone()
    save_file(sd, d / "model.safetensors")
    raw = cfg.to_dict()
    # the remote-code pointer safe-rlhf checkpoints may carry: must be ignored, not run
    raw.update(architectures=["LlamaForScore"], score_type="cost", score_dim=1, bias=True,
               do_normalize=False, auto_map={"AutoModelForScore": "no_such_module.LlamaForScore"})
    (d / "config.json").write_text(json.dumps(raw))
    tok.save_pretrained(d)
    return d, backbone, head, tok


def _hand_saferlhf(backbone, head, tok, prompts, responses):
    out = []
    for p_ids, r_ids in encode_pairs(tok, prompts, responses, template=PKU_TEMPLATE):
        with torch.no_grad():
            h = backbone(input_ids=torch.tensor([p_ids + r_ids])).last_hidden_state[0, -1]
            out.append(float(h @ head.weight[0] + head.bias[0]))
    return np.array(out)


def test_saferlhf_score_model_matches_hand_computation(saferlhf_dir):
    d, backbone, head, tok = saferlhf_dir
    s = load_scorer(str(d), batch_size=3)
    assert isinstance(s, SafeRLHFScorer) and s.kind == "cost"  # score_type in its config
    want = _hand_saferlhf(backbone, head, tok, PROMPTS, RESPONSES)
    np.testing.assert_allclose(s(PROMPTS, RESPONSES), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(s.safety(PROMPTS, RESPONSES), -want, atol=1e-4, rtol=0)
    # a prefix wins over the config
    assert load_scorer(f"safety:{d}").kind == "safety"
    np.testing.assert_allclose(load_scorer(f"safety:{d}").safety(PROMPTS, RESPONSES), want, atol=1e-4)


def test_saferlhf_normalizer_applied(saferlhf_dir, tmp_path):
    import shutil

    d, backbone, head, tok = saferlhf_dir
    shutil.copytree(d, tmp_path / "m")
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "m" / "model.safetensors")
    sd["normalizer.mean"], sd["normalizer.var"] = torch.tensor([0.5]), torch.tensor([4.0])
    sd["normalizer.count"] = torch.tensor(10)
    save_file(sd, tmp_path / "m" / "model.safetensors")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["do_normalize"] = True
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    want = (_hand_saferlhf(backbone, head, tok, PROMPTS, RESPONSES) - 0.5) / 2.0
    np.testing.assert_allclose(load_scorer(str(tmp_path / "m"))(PROMPTS, RESPONSES), want, atol=1e-4)


@pytest.fixture(scope="module")
def seqcls_dir(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    tok = make_tiny_tokenizer()
    cfg = _tiny_llama_config(len(tok))
    cfg.num_labels = 1
    torch.manual_seed(2)
    model = LlamaForSequenceClassification(cfg).eval()
    d = tmp_path_factory.mktemp("rm-tiny")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model, tok


def test_sequence_classifier_matches_hand_computation(seqcls_dir):
    d, model, tok = seqcls_dir
    s = load_scorer(f"reward:{d}", batch_size=3)
    assert isinstance(s, SequenceClassifierScorer) and s.kind == "reward"
    want = []
    for p, r in zip(PROMPTS, RESPONSES):
        ids = tok(p, r)["input_ids"]  # no chat template: a text pair
        with torch.no_grad():
            h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            want.append(float(h @ model.score.weight[0]))
    np.testing.assert_allclose(s(PROMPTS, RESPONSES), want, atol=1e-4, rtol=0)
    assert load_scorer(str(d)).kind is None  # nothing declares what it measures


def test_sequence_classifier_with_two_labels_is_refused(tmp_path):
    from transformers import LlamaForSequenceClassification

    tok = make_tiny_tokenizer()
    cfg = _tiny_llama_config(len(tok))
    cfg.num_labels = 2
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="one output"):
        load_scorer(str(tmp_path))


def test_callable_scorers(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(textwrap.dedent("""
        calls = []
        def length(prompts, responses):
            calls.append(len(prompts))
            return [float(len(r)) - 0.5 * len(p) for p, r in zip(prompts, responses)]
        def unsafe_words(prompts, responses):
            return [float(r.count("lock")) for r in responses]
        unsafe_words.kind = "cost"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    want = np.array([len(r) - 0.5 * len(p) for p, r in zip(PROMPTS, RESPONSES)])
    s = load_scorer("my_scores:length", batch_size=3)
    np.testing.assert_allclose(s(PROMPTS, RESPONSES), want)
    import my_scores
    assert my_scores.calls[-2:] == [3, 1]  # called in batches
    np.testing.assert_allclose(load_scorer(f"{tmp_path}/my_scores.py:length")(PROMPTS, RESPONSES), want)
    c = load_scorer("my_scores:unsafe_words")
    assert c.kind == "cost"
    np.testing.assert_allclose(c.safety(["a"], ["lock lock"]), [-2.0])
    # harm: only cost above 0 counts; safe answers all score 0, the unsafe rule is unchanged
    h = load_scorer("harm:my_scores:unsafe_words")
    assert h.kind == "harm"
    np.testing.assert_allclose(h.safety(["a"] * 2, ["lock lock", "open"]), [-2.0, 0.0])
    h2 = load_scorer("harm:my_scores:length")
    np.testing.assert_allclose(h2.safety(["abcd", "abcd"], ["a", "abcdefgh"]), [0.0, -6.0])
    obj = load_scorer(lambda p, r: [1.0] * len(p))
    assert isinstance(obj, CallableScorer) and obj.kind is None
    with pytest.raises(InputError, match="cost model without a sign"):
        obj.safety(["a"], ["b"])
    with pytest.raises(InputError, match="has no callable"):
        load_scorer("my_scores:nope")
    with pytest.raises(InputError, match="returned 1 scores for 2 pairs"):
        load_scorer(lambda p, r: [1.0])(["a", "b"], ["c", "d"])


def test_safety_sign_must_be_declared(seqcls_dir, saferlhf_dir):
    with pytest.raises(InputError, match="cost model without a sign"):
        check_safety_sign(str(seqcls_dir[0]), "harm")
    check_safety_sign(f"cost:{seqcls_dir[0]}", "harm")
    check_safety_sign(str(saferlhf_dir[0]), "harm")  # score_type: cost in its config
    with pytest.raises(InputError, match="unknown scorer"):
        load_scorer("./no/such/dir")


def test_head_scorer_dispatch_and_declared_kind(tmp_path, tiny_model_dir, tiny_model, tiny_tokenizer):
    """A directory with dualign_scorer.json goes to HeadScorer; its declared kind ("cost")
    lets `dualign score --safety NAME=DIR` negate it without a prefix."""
    from dualign.models.features import pooled_features
    from dualign.models.head_scorer import HeadScorer

    rng = np.random.default_rng(0)
    head = HeadScorer("cost", str(tiny_model_dir), rng.normal(size=32), 0.5, rng.normal(size=32),
                      rng.uniform(0.5, 2.0, size=32), pooling="mean")
    head.save(tmp_path / "cost-head")
    s = load_scorer(str(tmp_path / "cost-head"))
    assert s.kind == "cost"
    x = pooled_features(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, pooling="mean")
    want = ((x - head.feature_mean) / head.feature_std) @ head.weight + head.bias  # by hand
    np.testing.assert_allclose(s(PROMPTS, RESPONSES), want, rtol=1e-5, atol=1e-5)
    check_safety_sign(str(tmp_path / "cost-head"), "harm")  # declared: no prefix needed
    run = tmp_path / "run"
    run.mkdir()
    smp = _samples(2, 2)
    smp.to_parquet(run / "samples.parquet")
    assert main(["score", "--samples", str(run / "samples.parquet"),
                 "--safety", f"harm={tmp_path / 'cost-head'}"]) == 0
    x = pooled_features(tiny_model, tiny_tokenizer, smp["prompt"].tolist(), smp["response"].tolist(), pooling="mean")
    cost = ((x - head.feature_mean) / head.feature_std) @ head.weight + head.bias
    np.testing.assert_allclose(pd.read_parquet(run / "scores.parquet")["safety/harm"], -cost, rtol=1e-5, atol=1e-5)


def _samples(n_prompts=3, k=2):
    rows = [(p, f"prompt {p}?", s, f"answer {p}.{s} " + "lock" * s) for p in range(n_prompts) for s in range(k)]
    return pd.DataFrame(rows, columns=["prompt_id", "prompt", "sample_id", "response"]).assign(
        n_tokens=5, seed=0, model="x")


def test_cli_score_and_logprobs(tmp_path, monkeypatch, capsys, saferlhf_dir, tiny_model_dir,
                                tiny_model, tiny_tokenizer):
    (tmp_path / "user_rm.py").write_text("def r(p, y):\n    return [float(len(x)) for x in y]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    s = _samples()
    s.to_parquet(run / "samples.parquet")
    d, backbone, head, tok = saferlhf_dir
    assert main(["score", "--samples", str(run / "samples.parquet"), "--reward", "user_rm:r",
                 "--safety", f"harm={d}", "--batch-size", "4"]) == 0
    sc = pd.read_parquet(run / "scores.parquet")
    assert list(sc.columns) == ["prompt_id", "sample_id", "prompt", "response", "reward", "safety/harm"]
    np.testing.assert_allclose(sc["reward"], s["response"].str.len())
    cost = _hand_saferlhf(backbone, head, tok, s["prompt"].tolist(), s["response"].tolist())
    np.testing.assert_allclose(sc["safety/harm"], -cost, atol=1e-4)  # a cost, negated

    # logprobs adds a column and keeps the scores
    assert main(["logprobs", "--model", str(tiny_model_dir), "--samples", str(run / "samples.parquet"),
                 "--name", "ref", "--no-progress"]) == 0
    sc2 = pd.read_parquet(run / "scores.parquet")
    pd.testing.assert_frame_equal(sc2[sc.columns], sc)
    from dualign.models.logprobs import logprobs
    want, _ = logprobs(tiny_model, tiny_tokenizer, s["prompt"].tolist(), s["response"].tolist(), batch_size=1)
    np.testing.assert_allclose(sc2["logp/ref"], want, atol=1e-4)
    capsys.readouterr()
    # same inputs again: nothing recomputed
    assert main(["logprobs", "--model", str(tiny_model_dir), "--samples", str(run / "samples.parquet"),
                 "--name", "ref", "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out

    # a safety model with no declared sign: one line, exit 2, nothing loaded
    (tmp_path / "rm2.py").write_text("def g(p, y):\n    return [0.0] * len(y)\n")
    assert main(["score", "--samples", str(run / "samples.parquet"), "--safety", "harm2=rm2:g"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cost model without a sign" in err and "\n" not in err


def test_write_scores_merges_on_keys(tmp_path):
    s = _samples()
    write_scores(tmp_path / "scores.parquet", s, {"reward": np.arange(6.0)})
    shuffled = s.sample(frac=1.0, random_state=0)
    out = write_scores(tmp_path / "scores.parquet", shuffled, {"safety/a": np.ones(6)})
    # the old column follows its (prompt_id, sample_id) key, not the row position
    want = shuffled["prompt_id"].to_numpy() * 2 + shuffled["sample_id"].to_numpy()
    np.testing.assert_array_equal(out["reward"], want)


def test_score_jobs_are_named_score_jobs():
    from dualign.pipelines.scoring import ScoreJob, score_jobs

    jobs = score_jobs("reward:/r", {"harm": "harm:/c", "tox": "cost:/t"})
    assert jobs == [ScoreJob("reward", "reward:/r", "reward"), ScoreJob("safety/harm", "harm:/c", "safety"),
                    ScoreJob("safety/tox", "cost:/t", "safety")]
    assert [j.column for j in jobs if j.role == "safety"] == ["safety/harm", "safety/tox"]
    column, spec, role = jobs[0]  # still a tuple where one is unpacked
    assert (column, spec, role) == ("reward", "reward:/r", "reward")
