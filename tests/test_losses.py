"""The soft-label DPO loss: hand values, gradient, stability, and TRL's DPO loss as a special case."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama
from dualign.train.losses import hard_labels, pseudo_preference_labels, pseudo_preference_loss


def _t(*v, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype)


def test_loss_equals_hand_computation():
    pl1, pl0, rl1, rl0 = _t(-3.0, -10.0), _t(-4.0, -7.5), _t(-3.5, -9.0), _t(-3.0, -8.0)
    p, beta = _t(0.8, 0.1), 0.5
    expected = []
    for i in range(2):
        delta = (pl1[i] - rl1[i]) - (pl0[i] - rl0[i])
        z = beta * float(delta)
        s = 1 / (1 + math.exp(-z))
        expected.append(-(float(p[i]) * math.log(s) + (1 - float(p[i])) * math.log(1 - s)))
    got = pseudo_preference_loss(pl1, pl0, rl1, rl0, p, beta, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert float(pseudo_preference_loss(pl1, pl0, rl1, rl0, p, beta)) == pytest.approx(np.mean(expected))
    # Δ = (−3+3.5) − (−4+3) = 1.5 for the first pair: a hand value, independent of the formula above
    assert float(got[0]) == pytest.approx(-(0.8 * math.log(1 / (1 + math.exp(-0.75)))
                                            + 0.2 * math.log(1 / (1 + math.exp(0.75)))))


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) * 3 for _ in range(4)]
    args = [a.detach().requires_grad_(True) for a in args]
    p = torch.rand(5, generator=g, dtype=torch.float64).requires_grad_(True)

    def f(a, b, c, d, labels):
        return pseudo_preference_loss(a, b, c, d, labels, beta=0.7)

    assert torch.autograd.gradcheck(f, (*args, p), eps=1e-6, atol=1e-8)


def test_optimum_is_logit_of_label():
    # d loss / d(βΔ) = σ(βΔ) − p: zero exactly at βΔ = logit(p)
    p = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    beta = 0.3
    delta = (torch.log(p / (1 - p)) / beta).requires_grad_(True)
    zero = torch.zeros(3, dtype=torch.float64)
    loss = pseudo_preference_loss(delta, zero, zero, zero, p, beta, reduction="none").sum()
    loss.backward()
    np.testing.assert_allclose(delta.grad.numpy(), 0.0, atol=1e-12)


def test_stable_for_extreme_margins():
    big = torch.tensor([1e4, -1e4], dtype=torch.float32, requires_grad=True)
    zero = torch.zeros(2)
    loss = pseudo_preference_loss(big, zero, zero, zero, torch.tensor([0.0, 1.0]), beta=1.0,
                                  reduction="none")
    assert torch.all(torch.isfinite(loss)) and loss.detach().numpy() == pytest.approx([1e4, 1e4])
    loss.sum().backward()
    assert torch.all(torch.isfinite(big.grad))


def test_bad_arguments_raise():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        pseudo_preference_loss(z, z, z, z, z, beta=0.0)
    with pytest.raises(ValueError, match="reduction"):
        pseudo_preference_loss(z, z, z, z, z, beta=1.0, reduction="sum")


def test_labels():
    p = pseudo_preference_labels([1.0, 0.0, 800.0, -800.0], [0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(p, [1 / (1 + math.e ** -1), 0.5, 1.0, 0.0], rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        pseudo_preference_labels([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        pseudo_preference_labels([np.inf], [1.0])


def test_hard_labels_are_seeded_bernoulli_draws():
    p = np.full(20_000, 0.3)
    h = hard_labels(p, seed=1)
    assert set(np.unique(h)) == {0.0, 1.0}
    assert h.mean() == pytest.approx(0.3, abs=0.015)
    np.testing.assert_array_equal(h, hard_labels(p, seed=1))
    assert not np.array_equal(h, hard_labels(p, seed=2))
    np.testing.assert_array_equal(hard_labels([0.0, 1.0], seed=0), [0.0, 1.0])
    with pytest.raises(ValueError):
        hard_labels([1.5])


# --- against TRL ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trl_setup(tiny_tokenizer, tmp_path_factory):
    """A TRL DPOTrainer (sigmoid loss) with a policy and a *different* reference model."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = tiny_tokenizer
    policy, ref = make_tiny_llama(len(tok), seed=0), make_tiny_llama(len(tok), seed=1)
    ds = Dataset.from_dict({
        "prompt": ["hi there", "what is up?", "tell me a joke"],
        "chosen": [" yes sure", " not much", " why did the chicken"],
        "rejected": [" no", " go away now", " knock knock who"]})
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to="none", beta=0.3,
                     loss_type=["sigmoid"], max_length=128, per_device_train_batch_size=3,
                     bf16=False)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds,
                         processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(len(ds))]
    return trainer, rows, policy, ref


def test_hard_labels_equal_trl_dpo_sigmoid_loss(trl_setup):
    """Labels in {0, 1} give TRL's DPO loss on the same batch (same tokens, same models)."""
    from dualign.models.text import response_logps

    trainer, rows, policy, ref = trl_setup
    batch = trainer.data_collator(rows)
    policy.eval()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(policy, batch))
        ids, mask = batch["input_ids"], batch["completion_mask"]
        lp = response_logps(policy(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids, mask)
        rp = response_logps(ref(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids, mask)
    b = len(rows)
    chosen, rejected = slice(0, b), slice(b, 2 * b)
    ours = pseudo_preference_loss(lp[chosen], lp[rejected], rp[chosen], rp[rejected],
                                  torch.ones(b), beta=0.3)
    # p = 0 with y1/y0 swapped is the same comparison
    swapped = pseudo_preference_loss(lp[rejected], lp[chosen], rp[rejected], rp[chosen],
                                     torch.zeros(b), beta=0.3)
    assert abs(trl_loss - math.log(2)) > 1e-3  # policy ≠ reference: a non-trivial value
    assert float(ours) == pytest.approx(trl_loss, abs=1e-5)
    assert float(swapped) == pytest.approx(trl_loss, abs=1e-5)


def test_preference_trainer_loss_equals_trl_on_trl_tokens(trl_setup, tmp_path):
    """Our Trainer's compute_loss (collator, one forward for y1 and y0, precomputed reference
    log-probs) equals TRL's loss on the same token ids."""
    from dualign.train.preference import (PreferenceCollator, PreferenceConfig,
                                          preference_trainer_class)

    trainer, rows, policy, ref = trl_setup
    items = [{"prompt_ids_1": r["prompt_ids"], "response_ids_1": r["chosen_ids"],
              "prompt_ids_0": r["prompt_ids"], "response_ids_0": r["rejected_ids"],
              "label": 1.0, "ref_logp_1": 0.0, "ref_logp_0": 0.0} for r in rows]
    collate = PreferenceCollator(pad_token_id=0)
    cfg = PreferenceConfig(output_dir=str(tmp_path), use_lora=False, beta=0.3)
    ours = preference_trainer_class()(model=policy, args=cfg.training_arguments(),
                                      data_collator=collate, beta=0.3)
    policy.eval()
    with torch.no_grad():
        ref_1, ref_0 = ours.policy_logps(ref, collate(items))
        for it, a, b in zip(items, ref_1.tolist(), ref_0.tolist()):
            it["ref_logp_1"], it["ref_logp_0"] = a, b
        batch = collate(items)
        our_loss = float(ours.compute_loss(policy, batch))
        trl_loss = float(trainer.compute_loss(policy, trainer.data_collator(rows)))
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
