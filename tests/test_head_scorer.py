"""HeadScorer on the tiny Llama: save/load round trip, the generic loader, and format errors."""
import json

import numpy as np
import pytest

import dualign.models.head_scorer as hs
from dualign.errors import InputError
from dualign.models.features import pooled_features
from dualign.models.head_scorer import CONFIG_FILE, WEIGHTS_FILE, HeadScorer

PROMPTS = ["How do I bake bread?", "Tell me a secret", "Hi"]
RESPONSES = ["Knead, proof, bake at 220C.", "No.", "Hello, how can I help?"]


def _head(tiny_model_dir, kind="cost", seed=0):
    d = 32
    rng = np.random.default_rng(seed)
    return HeadScorer(kind, str(tiny_model_dir), rng.normal(size=d), 0.25, rng.normal(size=d),
                      rng.uniform(0.5, 2.0, size=d), pooling="mean", meta={"metrics": {"test": {"x": 1}}})


def test_call_is_linear_map_of_features(tiny_model_dir, tiny_model, tiny_tokenizer):
    h = _head(tiny_model_dir)
    x = pooled_features(tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, pooling="mean")
    want = ((x - h.feature_mean) / h.feature_std) @ h.weight + h.bias
    np.testing.assert_allclose(h(PROMPTS, RESPONSES), want, rtol=1e-5, atol=1e-5)
    assert h([], []).shape == (0,)
    with pytest.raises(ValueError):
        h(PROMPTS, RESPONSES[:1])


def test_save_load_scores_identically(tmp_path, tiny_model_dir):
    h = _head(tiny_model_dir)
    before = h(PROMPTS, RESPONSES)
    h.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / CONFIG_FILE).read_text())
    assert cfg["format"] == "dualign-head-scorer" and cfg["version"] == 1 and cfg["kind"] == "cost"
    assert cfg["backbone"] == str(tiny_model_dir) and cfg["pooling"] == "mean"
    assert cfg["metrics"] == {"test": {"x": 1}}
    assert not [p for p in (tmp_path / "s").iterdir() if p.suffix == ".tmp"]
    g = HeadScorer.load(tmp_path / "s")
    assert g.kind == "cost" and g.meta["metrics"] == {"test": {"x": 1}}
    hs._RECENT.clear()  # recompute the features: the reloaded head must run the backbone itself
    np.testing.assert_array_equal(g(PROMPTS, RESPONSES), before)


def test_generic_loader_reads_it_and_negates_cost(tmp_path, tiny_model_dir):
    from dualign.models.scorers import load_scorer

    h = _head(tiny_model_dir)
    raw = h(PROMPTS, RESPONSES)
    h.save(tmp_path / "cost")
    s = load_scorer(str(tmp_path / "cost"))
    assert s.kind == "cost"
    hs._RECENT.clear()
    np.testing.assert_allclose(s(PROMPTS, RESPONSES), raw, rtol=1e-6)
    np.testing.assert_allclose(s.safety(PROMPTS, RESPONSES), -raw, rtol=1e-6)
    _head(tiny_model_dir, kind="reward").save(tmp_path / "reward")
    assert load_scorer(str(tmp_path / "reward")).kind == "reward"


def test_load_errors(tmp_path, tiny_model_dir):
    with pytest.raises(InputError, match="no config"):
        HeadScorer.load(tmp_path)
    _head(tiny_model_dir).save(tmp_path / "s")
    cfg_path = tmp_path / "s" / CONFIG_FILE
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "version": 99}))
    with pytest.raises(InputError, match="field 'version'"):
        HeadScorer.load(tmp_path / "s")
    cfg_path.write_text(json.dumps({**cfg, "kind": "safety"}))
    with pytest.raises(InputError, match="field 'kind'"):
        HeadScorer.load(tmp_path / "s")
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "s" / WEIGHTS_FILE).unlink()
    with pytest.raises(InputError, match="missing head weights"):
        HeadScorer.load(tmp_path / "s")
    with pytest.raises(ValueError):
        HeadScorer("utility", "x", np.ones(3), 0.0, np.zeros(3), np.ones(3))


def test_second_head_reuses_features_of_the_same_pairs(tiny_model_dir):
    a = _head(tiny_model_dir, kind="reward", seed=1)
    want = a(PROMPTS, RESPONSES)
    # same backbone spec and settings: the cost head must not run (or even load) a backbone
    b = _head(tiny_model_dir, kind="cost", seed=2)
    b.use_backbone(None, None)  # would fail if the backbone were run
    x = a.features(PROMPTS, RESPONSES)
    np.testing.assert_array_equal(b.features(PROMPTS, RESPONSES), x)
    np.testing.assert_allclose(a.score_features(x), want)
    # a subset of pairs already computed: read from the on-disk feature cache, no backbone run
    np.testing.assert_allclose(b.features(PROMPTS[:2], RESPONSES[:2]), x[:2], rtol=0, atol=0)
    # new pairs: computed afresh (here the disabled backbone fails)
    with pytest.raises((AttributeError, TypeError)):  # calling into the None backbone
        b(["a prompt never seen"], ["a response never seen"])
