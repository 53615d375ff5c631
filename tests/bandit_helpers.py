"""The bandit problem of the exactness tests (MoCAN's test_bandit.py, PeCAN's
test_pecan_bandit.py): 2 prompts, 3 fixed candidate responses each, known helpfulness r and
safety g, and helpers to read a policy restricted to the candidates."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dualign.models.logprobs import logprobs
from dualign.train import pseudo_preference_labels

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
def one_thread():
    """Tiny tensors gain nothing from 2 threads, and thread hand-offs stall badly when other
    processes share the 2 cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def restricted_logp(model, tok):
    """log π(y|x) of every candidate, shape (N, K), and its softmax over the K candidates."""
    n, k = len(PROMPTS), len(CANDIDATES[0])
    prompts = [p for p in PROMPTS for _ in range(k)]
    lp, _ = logprobs(model, tok, prompts, [c for cs in CANDIDATES for c in cs])
    lp = lp.reshape(n, k)
    pi = np.exp(lp - lp.max(1, keepdims=True))
    return lp, pi / pi.sum(1, keepdims=True)


def candidate_pairs(score=None) -> pd.DataFrame:
    """Every unordered pair of candidates per prompt (prompt, response_0, response_1), with
    the soft label σ(score(y1) − score(y0)) when `score` (shape (N, K)) is given."""
    rows = []
    for x, cands in enumerate(CANDIDATES):
        for i in range(len(cands)):
            for j in range(i + 1, len(cands)):
                row = {"prompt": PROMPTS[x], "response_0": cands[i], "response_1": cands[j]}
                if score is not None:
                    row["label"] = float(pseudo_preference_labels(score[x, j], score[x, i]))
                rows.append(row)
    return pd.DataFrame(rows)


def tilted(pi_ref, score, beta=BETA):
    """π_ref · exp(score/β), normalized over each prompt's candidates."""
    t = pi_ref * np.exp((score - score.max(1, keepdims=True)) / beta)
    return t / t.sum(1, keepdims=True)


def reward_for_dual(reward, pi_ref, beta=BETA):
    """The reward the dual must see for its uniform-weight tilt to be π_ref·exp(r_λ/β) on the
    candidates.

    The dual treats its K samples as equally likely under π_ref; our candidates are not.
    Folding β·log(K·π_ref) into the reward makes its tilt exactly π_ref·exp(r_λ/β) on the
    candidate set; the offset is the same for every λ, so λ* and the safety gain of π_λ
    (measured against the uniform mean, as the dual does) are those of this bandit.
    """
    return reward + beta * np.log(pi_ref.shape[1] * pi_ref)


def tv(p, q):
    """Total variation between rows of two (N, K) distributions, shape (N,)."""
    return 0.5 * np.abs(p - q).sum(1)
