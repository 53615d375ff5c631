"""Score-model losses and head fitting, against hand computations and known linear truths."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from dualign.models.head_scorer import CONFIG_FILE, WEIGHTS_FILE, HeadScorer
from dualign.train.scorer import (DEFAULT_POOLING, ScorerTrainConfig, bradley_terry_loss, cost_loss, fit_head,
                                  pair_metrics, split_by_prompt, train_scorer)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_by_hand():
    a, b = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    want = -(math.log(_sig(1.5)) + math.log(_sig(-2.0))) / 2
    assert float(bradley_terry_loss(a, b)) == pytest.approx(want, rel=1e-6)


def test_cost_loss_by_hand():
    cs, cu = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 0.2])
    ss, su = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 0.0])  # second unsafer answer unlabeled
    pair = -(math.log(_sig(3.0)) + math.log(_sig(-0.3))) / 2
    # labeled answers: safer 1 (c=-1, s=-1), safer 2 (c=.5, s=-1), unsafer 1 (c=2, s=+1)
    sign = -(math.log(_sig(1.0)) + math.log(_sig(-0.5)) + math.log(_sig(2.0))) / 3
    assert float(cost_loss(cs, cu)) == pytest.approx(pair, rel=1e-6)
    assert float(cost_loss(cs, cu, ss, su)) == pytest.approx(pair + sign, rel=1e-6)
    assert float(cost_loss(cs, cu, ss, su, sign_weight=0.5)) == pytest.approx(pair + 0.5 * sign, rel=1e-6)


def _synthetic(n=400, d=12, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    w /= np.linalg.norm(w)
    xa, xb = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    return w, xa, xb


def test_reward_head_recovers_direction():
    w_true, xa, xb = _synthetic()
    a_better = (xa - xb) @ w_true > 0
    xp, xo = np.where(a_better[:, None], xa, xb), np.where(a_better[:, None], xb, xa)
    w, b = fit_head(xp, xo, kind="reward", l2=1e-3)
    assert b == 0.0
    assert w @ w_true / np.linalg.norm(w) > 0.95


def test_cost_head_sign_separates_safe_from_unsafe():
    w_true, xa, xb = _synthetic(seed=1)
    offset = 0.3  # unsafe iff w·x > offset: the bias must be learned too
    ua, ub = xa @ w_true > offset, xb @ w_true > offset
    a_safer = xa @ w_true < xb @ w_true
    xs, xu = np.where(a_safer[:, None], xa, xb), np.where(a_safer[:, None], xb, xa)
    ss = np.where(a_safer, np.where(ua, 1.0, -1.0), np.where(ub, 1.0, -1.0))
    su = np.where(a_safer, np.where(ub, 1.0, -1.0), np.where(ua, 1.0, -1.0))
    w, b = fit_head(xs, xu, kind="cost", sign_pref=ss, sign_other=su, l2=1e-3)
    assert w @ w_true / np.linalg.norm(w) > 0.95
    c = np.concatenate([xs, xu]) @ w + b
    unsafe = np.concatenate([ss, su]) > 0
    assert ((c > 0) == unsafe).mean() > 0.95
    # the threshold sits near the true one: -b/|w| ≈ offset
    assert -b / np.linalg.norm(w) == pytest.approx(offset, abs=0.15)


def _frame(xa, xb, w_true):
    """A normalized preference table whose texts are indices into a feature table."""
    n = len(xa)
    better = ((xa - xb) @ w_true < 0).astype(int)  # 1 when b is better
    unsafe_a, unsafe_b = xa @ w_true < 0, xb @ w_true < 0  # low reward = unsafe, for the test
    return pd.DataFrame({"prompt": [f"p{i}" for i in range(n)],
                         "response_0": [f"a{i}" for i in range(n)], "response_1": [f"b{i}" for i in range(n)],
                         "better_response_id": better, "safer_response_id": better,
                         "is_response_0_safe": pd.array(~unsafe_a, dtype="boolean"),
                         "is_response_1_safe": pd.array(~unsafe_b, dtype="boolean")})


def test_pair_metrics_by_hand():
    df = pd.DataFrame({"better_response_id": [0, 1, 1], "safer_response_id": [0, 1, 0],
                       "is_response_0_safe": pd.array([True, False, True], dtype="boolean"),
                       "is_response_1_safe": pd.array([False, True, True], dtype="boolean")})
    s0, s1 = np.array([1.0, 0.0, 2.0]), np.array([0.0, 1.0, 2.0])
    assert pair_metrics(s0, s1, df, "reward")["pairwise_accuracy"] == pytest.approx(2 / 3)  # tie = error
    c0, c1 = np.array([-1.0, 2.0, -0.5]), np.array([3.0, -2.0, 0.5])
    m = pair_metrics(c0, c1, df, "cost")
    assert m["pairwise_accuracy"] == pytest.approx(1.0)
    assert m["sign_accuracy"] == pytest.approx(5 / 6)  # c1 of pair 3 is > 0 but safe
    assert m["n_pairs_mixed"] == 2 and m["pairwise_accuracy_mixed"] == 1.0


def test_split_by_prompt_keeps_prompts_together():
    df = pd.DataFrame({"prompt": ["a", "a", "b", "c", "c", "d", "e"], "x": range(7)})
    tr, te = split_by_prompt(df, 0.4, seed=3)
    assert set(tr["prompt"]).isdisjoint(te["prompt"]) and len(tr) + len(te) == 7 and len(te) > 0


@pytest.fixture
def feature_cache(tmp_path):
    """Synthetic features written into the real on-disk feature cache under the keys
    `train_scorer` will look up, for a backbone name that names no model: training must then
    run entirely from the cache (a miss would fail loading the backbone)."""
    from dualign.models.features import store_features

    w_true, xa, xb = _synthetic(n=300, d=8, seed=4)
    df = _frame(xa, xb, w_true)
    cache = tmp_path / "features"
    p = df["prompt"].tolist()
    store_features("no-such-backbone", p + p, df["response_0"].tolist() + df["response_1"].tolist(),
                   np.concatenate([xa, xb]), pooling=DEFAULT_POOLING, cache_dir=cache)
    return df, w_true, cache


@pytest.mark.parametrize("kind", ["reward", "cost"])
def test_train_scorer_end_to_end_on_features(tmp_path, feature_cache, kind):
    df, w_true, cache = feature_cache
    logs = []
    res = train_scorer(df, ScorerTrainConfig(kind=kind, backbone="no-such-backbone"),
                       out_dir=tmp_path / kind, cache_dir=cache, log=logs.append)
    m = res.metrics["test"]
    assert m["pairwise_accuracy"] > 0.9
    if kind == "cost":
        assert m["sign_accuracy"] > 0.9
    assert "held-out pairwise accuracy" in logs[0]
    cfg = json.loads((tmp_path / kind / CONFIG_FILE).read_text())
    assert cfg["format"] == "dualign-head-scorer" and cfg["version"] == 1 and cfg["kind"] == kind
    assert cfg["metrics"]["test"]["pairwise_accuracy"] == m["pairwise_accuracy"]
    assert (tmp_path / kind / WEIGHTS_FILE).exists()
    # the saved head, in raw feature space, points along the truth (cost: against it)
    h = HeadScorer.load(tmp_path / kind)
    direction = h.weight / h.feature_std
    cos = direction @ w_true / np.linalg.norm(direction)
    assert (cos if kind == "reward" else -cos) > 0.95


def test_cost_needs_safety_labels():
    df = pd.DataFrame({"prompt": ["a"] * 4, "response_0": ["x"] * 4, "response_1": ["y"] * 4,
                       "better_response_id": [0] * 4, "safer_response_id": [-1] * 4,
                       "is_response_0_safe": pd.array([None] * 4, dtype="boolean"),
                       "is_response_1_safe": pd.array([None] * 4, dtype="boolean")})
    from dualign.errors import InputError
    with pytest.raises(InputError, match="safer_response_id"):
        train_scorer(df, ScorerTrainConfig(kind="cost"))


def test_cost_loss_leaves_pairs_of_two_safe_answers_out_of_the_ranking():
    # pair 1: both safe (ranked only with rank_both_safe); pair 2: safe vs unsafe
    cs, cu = torch.tensor([-3.0, -1.0]), torch.tensor([-0.5, 2.0])
    ss, su = torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, 1.0])
    sign = -(math.log(_sig(3.0)) + math.log(_sig(1.0)) + math.log(_sig(0.5)) + math.log(_sig(2.0))) / 4
    ranked_all = -(math.log(_sig(2.5)) + math.log(_sig(3.0))) / 2
    ranked_mixed = -math.log(_sig(3.0))
    assert float(cost_loss(cs, cu, ss, su)) == pytest.approx(ranked_all + sign, rel=1e-6)
    assert float(cost_loss(cs, cu, ss, su, rank_both_safe=False)) == pytest.approx(ranked_mixed + sign, rel=1e-6)
    # only pairs of two safe answers: the sign term alone
    assert float(cost_loss(cs[:1], cu[:1], ss[:1], su[:1], rank_both_safe=False)) == pytest.approx(
        -(math.log(_sig(3.0)) + math.log(_sig(0.5))) / 2, rel=1e-6)


def test_two_safe_answers_get_no_safety_ranking_by_default():
    """With the default, a cost head does not learn which of two safe answers 'says less'."""
    rng = np.random.default_rng(0)
    n, d = 300, 6
    # feature 0: compliance with a harmful request (unsafe); feature 1: "says less" (refusal style)
    harmful_safe, harmful_unsafe = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    harmful_unsafe[:, 0] += 3.0
    benign_terse, benign_helpful = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    benign_terse[:, 1] += 3.0
    xp = np.concatenate([harmful_safe, benign_terse])  # the label's "safer" answer
    xo = np.concatenate([harmful_unsafe, benign_helpful])
    sp = np.concatenate([-np.ones(n), -np.ones(n)])
    so = np.concatenate([np.ones(n), -np.ones(n)])
    w_all, _ = fit_head(xp, xo, kind="cost", sign_pref=sp, sign_other=so, l2=0.01)
    w_mixed, _ = fit_head(xp, xo, kind="cost", sign_pref=sp, sign_other=so, l2=0.01, rank_both_safe=False)
    assert w_all[1] < -0.5  # Safe RLHF's ranking: terseness lowers the cost
    assert abs(w_mixed[1]) < 0.5 * abs(w_all[1])
    assert w_mixed[0] > 0.5 and w_all[0] > 0.5  # both learn that compliance costs
    assert ScorerTrainConfig().rank_both_safe is False
