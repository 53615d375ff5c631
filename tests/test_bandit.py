"""Exactness end to end: on a bandit problem the trained policy is the dual's π_{λ*}.

A tiny model, 2 prompts, 3 fixed candidate responses each, known rewards r and safety
scores g. λ* comes from the dual solver; pairs cover every candidate pair with the soft
label p = σ(r_λ(y1) − r_λ(y0)). The soft-label DPO loss is minimized pair by pair exactly
when β·Δ = logit(p), i.e. when, on the candidate set,

    π_θ(y) ∝ π_ref(y) · exp((r(y) + λ* g(y)) / β),

so after enough steps the trained policy restricted to the candidates must match that
distribution (total variation < 0.05), and its safety gain the dual's prediction.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import make_tiny_llama
from dualign.models.logprobs import logprobs
from dualign.train import PreferenceConfig, pseudo_preference_labels, train_preferences

BETA = 0.5
PROMPTS = ["How do I open a locked door?", "Tell me about fire."]
# Equal byte lengths keep the tiny random model's π_ref within a few nats across candidates,
# so the target is a proper mixture rather than a point mass.
CANDIDATES = [["Call a locksmith", "Kick it in hard!", "Use the spare k."],
              ["Keep a distance.", "Burn stuff, fun!", "It glows orange."]]
# helpfulness r and safety g (higher = safer) of each candidate, shape (N, K)
REWARD = np.array([[0.4, 0.9, -0.2], [0.3, 0.8, -0.3]])
SAFETY = np.array([[0.8, -0.9, 0.2], [0.7, -1.0, 0.1]])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors gain nothing from 2 threads, and thread hand-offs stall badly when other
    # processes share the 2 cores.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _restricted_logp(model, tok):
    """log π(y|x) of every candidate, shape (N, K), and its softmax over the K candidates."""
    n, k = len(PROMPTS), len(CANDIDATES[0])
    prompts = [p for p in PROMPTS for _ in range(k)]
    lp, _ = logprobs(model, tok, prompts, [c for cs in CANDIDATES for c in cs])
    lp = lp.reshape(n, k)
    pi = np.exp(lp - lp.max(1, keepdims=True))
    return lp, pi / pi.sum(1, keepdims=True)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_trained_policy_is_the_tilted_policy(tiny_tokenizer, tmp_path, use_lora):
    from dualign.dual import solve_dual  # written alongside; the test needs it

    tok = tiny_tokenizer
    model = make_tiny_llama(len(tok), seed=3)
    _, pi_ref = _restricted_logp(model, tok)
    n, k = REWARD.shape

    # The dual treats its K samples as equally likely under π_ref; our candidates are not.
    # Folding β·log(K·π_ref) into the reward makes its tilt exactly π_ref·exp(r_λ/β) on the
    # candidate set; the offset is the same for every λ, so λ* and the safety gain of π_λ
    # (measured against the uniform mean, as the dual does) are those of this bandit.
    reward_for_dual = REWARD + BETA * np.log(k * pi_ref)
    mg = solve_dual(reward_for_dual, SAFETY, beta=BETA, margins=0.0).max_gain[0]
    dual = solve_dual(reward_for_dual, SAFETY, beta=BETA, margins=0.5 * mg)
    lam = float(dual.lam[0])
    print(f"λ* = {lam:.4f}")
    assert lam > 0.1  # the constraint binds: safety really reshapes the target

    r_lam = REWARD + lam * SAFETY
    target = pi_ref * np.exp(r_lam / BETA)
    target /= target.sum(1, keepdims=True)
    np.testing.assert_allclose((target * SAFETY).sum(1).mean() - SAFETY.mean(),
                               dual.predicted.safety_gain[0], atol=1e-8)

    rows = []
    for x in range(n):
        for i in range(k):
            for j in range(i + 1, k):
                rows.append({"prompt": PROMPTS[x], "response_0": CANDIDATES[x][i],
                             "response_1": CANDIDATES[x][j],
                             "label": float(pseudo_preference_labels(r_lam[x, j], r_lam[x, i]))})
    pairs = pd.DataFrame(rows)

    cfg = PreferenceConfig(beta=BETA, use_lora=use_lora, lora_r=8, lora_alpha=16,
                           learning_rate=1e-2 if use_lora else 3e-3, max_steps=100,
                           per_device_train_batch_size=len(pairs), lr_scheduler_type="linear",
                           save_steps=10_000, logging_steps=50, output_dir=str(tmp_path / "run"),
                           seed=0)
    result = train_preferences(model, tok, pairs, cfg, resume=False)
    _, pi = _restricted_logp(result.model, tok)
    print("π_ref", pi_ref.round(3), "target", target.round(3), "trained", pi.round(3))

    tv = 0.5 * np.abs(pi - target).sum(1)
    tv_ref = 0.5 * np.abs(pi_ref - target).sum(1)
    assert tv_ref.max() > 0.2, "the target must differ from the reference for the test to bite"
    assert tv.max() < 0.05, f"TV(trained, π_λ*) per prompt = {tv}, target {target}, got {pi}"

    achieved = (pi * SAFETY).sum(1).mean() - SAFETY.mean()
    assert achieved == pytest.approx(dual.predicted.safety_gain[0], abs=0.05)
