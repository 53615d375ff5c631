"""PeCAN's exactness end to end on the bandit problem of test_bandit.py.

No reward or safety scores reach PeCAN: only two pre-aligned policies, trained from π_ref
so that their log-ratios encode the known r and g — π_r ∝ π_ref·exp(r/β) and
π_g ∝ π_ref·exp(g/β) on the candidates (soft-label DPO on every candidate pair). PeCAN's
own stages then read r̂ = β log π_r/π_ref and ĝ = β log π_g/π_ref off the policies' log-
probs, solve the dual, relabel the candidate pairs with σ(Δr̂ + λ*Δĝ) and train once. The
trained policy restricted to the candidates must be π_{λ*} = π_ref·exp((r + λ*g)/β), with
λ* the dual solution of the TRUE r and g, within total variation 0.05.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bandit_helpers import (BETA, CANDIDATES, PROMPTS, REWARD, SAFETY, candidate_pairs,  # noqa: F401
                            one_thread, restricted_logp, reward_for_dual, tilted, tv)
from conftest import make_tiny_llama
from dualign.dual import solve_dual
from dualign.models.loading import load_policy
from dualign.pipelines import stages as S
from dualign.pipelines.config import PeCANConfig
from dualign.pipelines.implicit import add_implicit_columns
from dualign.pipelines.scoring import logprob_columns
from dualign.pipelines.pairs import dataset_as_samples, pairs_from_scored_dataset
from dualign.pipelines.pecan import logprob_models
from dualign.runio import write_parquet
from dualign.train import PreferenceConfig, train_preferences

ROLES = {"reward": "helpful", "safety/harmless": "safety_harmless"}
FULL = dict(use_lora=False, learning_rate=3e-3, max_steps=100, per_device_train_batch_size=6,
            save_steps=10_000, logging_steps=50, seed=0)


def implicit(paths, models):
    """PeCAN's score stage: log-probs of every model, then β·log-ratios."""
    logprob_columns(paths, models, log=lambda *a: None)
    return [add_implicit_columns(p, ROLES, BETA) for p in paths]


def test_pecan_recovers_the_tilted_policy_from_prealigned_policies(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    ref_dir = tmp_path / "ref"
    make_tiny_llama(len(tok), seed=3).save_pretrained(ref_dir)
    tok.save_pretrained(ref_dir)
    _, pi_ref = restricted_logp(load_policy(str(ref_dir))[0], tok)

    # pre-aligned policies encoding r and g: DPO's optimum on σ(s(y1) − s(y0)) labels is π_ref·exp(s/β)
    policies = {}
    for name, s in (("helpful", REWARD), ("safety_harmless", SAFETY)):
        cfg = PreferenceConfig(beta=BETA, output_dir=str(tmp_path / name), **FULL)
        policies[name] = str(train_preferences(load_policy(str(ref_dir))[0], tok, candidate_pairs(s), cfg).model_dir)
    models = logprob_models(str(ref_dir), policies)

    # the candidates as PeCAN's "samples" (prompt_id × sample_id), scored implicitly
    run = tmp_path / "run"
    n, k = REWARD.shape
    samples = pd.DataFrame({"prompt_id": np.repeat(np.arange(n), k), "sample_id": np.tile(np.arange(k), n),
                            "prompt": np.repeat(PROMPTS, k), "response": np.ravel(CANDIDATES)})
    write_parquet(samples, run / "samples.parquet")
    scores = implicit([run / "samples.parquet"], models)[0]
    r_hat = scores["reward"].to_numpy().reshape(n, k)
    g_hat = scores["safety/harmless"].to_numpy().reshape(n, k)
    centered = lambda a: a - a.mean(1, keepdims=True)  # noqa: E731  (equal up to a prompt-only constant)
    print("r̂ − r", (centered(r_hat) - centered(REWARD)).round(3),
          "ĝ − g", (centered(g_hat) - centered(SAFETY)).round(3))
    np.testing.assert_allclose(centered(r_hat), centered(REWARD), atol=0.05)
    np.testing.assert_allclose(centered(g_hat), centered(SAFETY), atol=0.05)

    # the dual on the implicit scores (π_ref folded in: the candidates are not π_ref draws)
    folded = scores.copy()
    folded["reward"] = reward_for_dual(r_hat, pi_ref).ravel()
    true_mg = solve_dual(reward_for_dual(REWARD, pi_ref), SAFETY, beta=BETA, margins=0.0).max_gain[0]
    margin = 0.5 * true_mg
    settings = PeCANConfig(beta=BETA, margins={"harmless": margin}, margin_fraction=0.5, bootstrap=20, seed=0,
                           train=FULL)
    dual = S.dual_stage(run, folded, ["safety/harmless"], settings, log=lambda *a: None)
    lam = dual.lam[0]
    lam_true = float(solve_dual(reward_for_dual(REWARD, pi_ref), SAFETY, beta=BETA, margins=margin).lam[0])
    print(f"λ* from implicit scores {lam:.4f}, from the true r, g {lam_true:.4f}")
    assert lam_true > 0.1 and lam == pytest.approx(lam_true, abs=0.1)

    # relabel the candidate pairs with σ(Δr̂ + λ*Δĝ) through PeCAN's pairs path, train once
    source = run / "pairs_source" / "samples.parquet"
    write_parquet(dataset_as_samples(candidate_pairs()), source)
    pairs = pairs_from_scored_dataset(implicit([source], models)[0])
    pairs = S.pairs_stage(run, pairs, dual.lam, ["safety/harmless"], key="bandit")
    result = S.train_stage(run, load_policy(str(ref_dir))[0], tok, pairs, settings, {"method": "pecan"})
    _, pi = restricted_logp(result.model, tok)

    target = tilted(pi_ref, REWARD + lam_true * SAFETY)  # π_{λ*} of the true problem
    print("π_ref", pi_ref.round(3), "target", target.round(3), "trained", pi.round(3))
    assert tv(pi_ref, target).max() > 0.2, "the target must differ from the reference for the test to bite"
    assert tv(pi, target).max() < 0.05, f"TV(trained, π_λ*) per prompt = {tv(pi, target)}"
    achieved = (pi * SAFETY).sum(1).mean() - SAFETY.mean()
    assert achieved == pytest.approx(json.loads((run / "dual.json").read_text())["constraints"][0]["predicted_gain"],
                                     abs=0.05)
