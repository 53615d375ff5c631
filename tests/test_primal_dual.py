"""The Safe-RLHF-style primal–dual baseline: the dual update, its fixed point on the bandit
(the dual's λ*), and the loop on TRL's GRPOTrainer (λ per step, direction, resume)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bandit_helpers import BETA, REWARD, SAFETY, one_thread, reward_for_dual, tilted  # noqa: F401
from conftest import make_tiny_llama
from dualign.errors import InputError
from dualign.train.primal_dual import (LOG_FILE, STATE_FILE, LagrangeState, PrimalDualConfig,
                                       lagrange_step, train_primal_dual)

# ----------------------------------------------------------------------------- the update rule


def test_lagrange_step_rises_while_violated_and_falls_to_zero_when_slack():
    # violated: mean 0.2 < target 0.5 → λ rises by lr × 0.3
    assert lagrange_step(1.0, 0.2, 0.5, 0.1, 5.0) == pytest.approx([1.03])
    # slack: mean 0.9 > target 0.5 → λ falls by lr × 0.4, then is clipped at exactly 0
    lam = np.array([1.0])
    seen = []
    for _ in range(40):
        lam = lagrange_step(lam, 0.9, 0.5, 0.1, 5.0)
        seen.append(float(lam[0]))
    assert seen[0] == pytest.approx(0.96)
    assert all(b <= a for a, b in zip(seen, seen[1:]))
    assert seen[-1] == 0.0 and min(seen) == 0.0
    # λ_max: a large violation cannot push λ above it
    assert lagrange_step(4.9, -10.0, 0.5, 0.1, 5.0) == pytest.approx([5.0])
    assert lagrange_step(5.0, 0.5, 0.5, 0.1, 5.0) == pytest.approx([5.0])  # no slack: no move


def test_lagrange_step_vector():
    lam = lagrange_step([1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.5, 0.5, 0.5], 0.2, [5.0, 5.0, 5.0])
    np.testing.assert_allclose(lam, [1.1, 0.9, 0.0])  # violated, slack, slack at 0
    # per-constraint λ_max
    np.testing.assert_allclose(lagrange_step([1.0, 1.0], [-9.0, -9.0], 0.0, 1.0, [2.0, 20.0]), [2.0, 10.0])
    with pytest.raises(ValueError):
        lagrange_step([1.0, 1.0], [0.0, 0.0, 0.0], 0.0, 0.1, 5.0)
    with pytest.raises(ValueError):
        lagrange_step([1.0], [0.0], 0.0, 0.0, 5.0)
    with pytest.raises(ValueError):
        lagrange_step([1.0], [np.nan], 0.0, 0.1, 5.0)


def test_state_window_keeps_the_last_episodes_and_round_trips():
    st = LagrangeState(["a", "b"], [1.0, 0.5], [0.0, 0.2], cost_window=4)
    st.record([1, 2, 3], [[1, 0], [2, 0], [3, 0]], [0, 0, 0], 30, 90)
    st.update(0.1, 5.0)
    st.record([4, 5], [[4, 1], [5, 1]], [0, 0], 20, 60)
    facts = st.update(0.1, 5.0)
    assert len(st.window) == 4  # the first episode left the window
    np.testing.assert_allclose(facts["window_safety"], [3.5, 0.5])
    np.testing.assert_allclose(facts["slack"], [3.5, 0.3])
    assert (st.generated_tokens, st.trained_tokens) == (50, 150)
    assert st.update(0.1, 5.0) is None  # no new episode: λ left as it is
    back = LagrangeState.from_dict(json.loads(json.dumps(st.to_dict())))
    np.testing.assert_array_equal(back.lam, st.lam)
    np.testing.assert_array_equal(back.window_means(), st.window_means())
    assert back.window.maxlen == 4 and back.generated_tokens == 50


@pytest.mark.parametrize("kwargs, name", [
    ({"lambda_lr": 0.0}, "lambda_lr"), ({"lambda_max": -1.0}, "lambda_max"),
    ({"cost_window": 0}, "cost_window"), ({"num_generations": 1}, "num_generations"),
    ({"per_device_train_batch_size": 6, "num_generations": 4}, "per_device_train_batch_size"),
    ({"lambda_init": 6.0}, "lambda_init"), ({"lambda_init": -0.1}, "lambda_init"),
    ({"safety_target": "high"}, "safety_target"), ({"beta": 0.0}, "beta"),
    ({"scale_rewards": "std"}, "scale_rewards"), ({"max_steps": -1, "num_train_epochs": 0}, "num_train_epochs"),
    ({"cost_window": 2.5}, "cost_window"),
])
def test_config_checks_name_the_field(kwargs, name):
    with pytest.raises(InputError, match=f"field '{name}"):
        PrimalDualConfig(**kwargs)


def test_config_from_dict_names_an_unknown_key():
    with pytest.raises(InputError, match=r"primal_dual.lambda_rate.*lambda_lr"):
        PrimalDualConfig.from_dict({"lambda_rate": 0.1})
    assert PrimalDualConfig.from_dict({"lambda_lr": 0.05}).lambda_lr == 0.05


# ----------------------------------------------------------------------------- the bandit
# π_ref on the bandit's candidates, fixed (no network): the exact policy update of the loop is
# π_λ ∝ π_ref exp((r + λᵀg)/β), so the primal–dual iteration is λ ← step(λ, E_{π_λ}[g]).
PI_REF = np.array([[0.5, 0.3, 0.2], [0.25, 0.6, 0.15]])
SAFETY_2 = np.array([[0.5, -0.2, 0.9], [0.1, -0.6, 0.8]])  # a second safety score


def _dual_and_targets(G, fractions):
    """λ* of the dual at margins = fractions × largest gains, and the targets t = ḡ + b in the
    dual's own units (its reference mean is the uniform mean over the candidates: see
    `reward_for_dual`)."""
    from dualign.dual import solve_dual

    r_dual = reward_for_dual(REWARD, PI_REF)
    mg = solve_dual(r_dual, G, beta=BETA, margins=0.0).max_gain
    margins = np.asarray(fractions) * mg
    dual = solve_dual(r_dual, G, beta=BETA, margins=margins)
    g = G.reshape(*G.shape[:2], -1)
    return dual.lam, g.mean(axis=(0, 1)) + margins


def _tilted_safety(lam, G):
    g = G.reshape(*G.shape[:2], -1)
    pi = tilted(PI_REF, REWARD + g @ lam)
    return np.einsum("nk,nkj->j", pi, g) / g.shape[0], pi


@pytest.mark.parametrize("G, fractions, binding", [
    (SAFETY, [0.5], [True]),
    (np.stack([SAFETY, SAFETY_2], -1), [0.5, 0.3], [True, True]),
    (np.stack([SAFETY, SAFETY_2], -1), [0.3, 0.6], [False, True]),  # the first is slack: λ*_1 = 0
], ids=["m1", "m2-both-bind", "m2-one-slack"])
def test_exact_primal_dual_iteration_reaches_the_duals_lambda(G, fractions, binding):
    lam_star, targets = _dual_and_targets(G, fractions)
    np.testing.assert_array_equal(lam_star > 1e-9, binding)  # the case is what its name says
    lam = np.ones(len(targets))  # Safe-RLHF's λ_init
    for _ in range(400):
        mean_g, _ = _tilted_safety(lam, G)
        lam = lagrange_step(lam, mean_g, targets, 0.5, 5.0)
    np.testing.assert_allclose(lam, lam_star, atol=1e-6)
    # and the fixed point meets every constraint, binding ones with equality
    mean_g, _ = _tilted_safety(lam, G)
    assert np.all(mean_g >= targets - 1e-6)
    np.testing.assert_allclose(mean_g[np.array(binding)], targets[np.array(binding)], atol=1e-6)


def test_sampled_primal_dual_with_the_episode_window_hovers_at_the_duals_lambda():
    """The loop as it runs in training: episodes sampled from π_λ, their safety scores through
    the `cost_window` deque of `LagrangeState`, one step per batch; λ averaged over the second
    half of the run is λ* within 3%."""
    lam_star, targets = _dual_and_targets(SAFETY, [0.5])
    rng = np.random.default_rng(0)
    st = LagrangeState(["safety"], [1.0], targets, cost_window=128)
    seen = []
    for _ in range(2000):
        _, pi = _tilted_safety(st.lam, SAFETY)
        x = rng.integers(0, 2, size=16)  # 16 episodes per batch
        k = (rng.random(16)[:, None] > np.cumsum(pi[x], axis=1)).sum(1)  # inverse CDF draw
        g = SAFETY[x, k]
        st.record(REWARD[x, k], g[:, None], REWARD[x, k] + st.lam[0] * g, 0, 0)
        st.update(0.1, 5.0)
        seen.append(st.lam[0])
    assert len(st.window) == 128
    assert np.mean(seen[1000:]) == pytest.approx(lam_star[0], rel=0.03)
    assert np.mean(seen[1000:]) != pytest.approx(1.0, abs=0.1)  # it moved from λ_init


# ----------------------------------------------------------------------------- GRPO

PROMPTS = ["hello there", "how do I bake bread?", "tell me a joke", "what is rust?"]


def _scorers(seen_prompts=None):
    from dualign.models.scorers import CallableScorer
    import toy_scorers

    def reward(prompts, responses):
        if seen_prompts is not None:
            seen_prompts.extend(prompts)
        return toy_scorers.reward(prompts, responses)

    safety = CallableScorer(toy_scorers.safety)
    # the same score under two constraints: one out of reach (λ must rise), one met (λ must fall)
    return CallableScorer(reward), {"unreachable": safety, "met": safety}


def _run(tok, out, steps, resume, seen=None):
    model = make_tiny_llama(len(tok), seed=0)
    cfg = PrimalDualConfig(safety_target={"unreachable": 2.0, "met": -5.0}, lambda_init=1.0, lambda_lr=0.1,
                           max_steps=steps, num_generations=4, per_device_train_batch_size=8,
                           max_new_tokens=8, lora_r=4, lora_alpha=8, save_steps=1, learning_rate=1e-2,
                           beta=0.1, template="Q: {prompt}\nA:")
    reward, safety = _scorers(seen)
    return train_primal_dual(model, tok, PROMPTS, reward, safety, cfg, out_dir=out, resume=resume)


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_grpo_primal_dual_logs_lambda_per_step_and_resumes_with_lambda_restored(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    seen = []
    full = _run(tok, tmp_path / "full", 4, resume=False, seen=seen)
    rows = _rows(full.log_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert full.lambda_history.shape == (4, 2) and full.global_step == 4
    # the scorers saw the raw prompts (not the template) and a group of 8 completions per step
    assert set(seen) <= set(PROMPTS) and len(seen) == 4 * 8

    for r in rows:
        for n in ("unreachable", "met"):
            moved = r["lambda"][n] - r["lambda_used"][n]
            expected = float(np.clip(r["lambda_used"][n] - 0.1 * r["slack"][n], 0.0, 5.0)) - r["lambda_used"][n]
            assert moved == pytest.approx(expected, abs=1e-12)
        assert r["slack"]["unreachable"] < 0 and r["lambda"]["unreachable"] > r["lambda_used"]["unreachable"]
        assert r["slack"]["met"] > 0 and (r["lambda"]["met"] < r["lambda_used"]["met"] or r["lambda"]["met"] == 0.0)
        # GRPO's reward was r + λᵀg with the λ of that step (TRL logs its mean as "reward")
        shaped = r["reward"] + sum(r["lambda_used"][n] * r["safety"][n] for n in ("unreachable", "met"))
        assert r["shaped_reward"] == pytest.approx(shaped, abs=1e-9)
        assert r["kl"] is not None and r["kl"] >= 0 and r["generated_tokens"] > 0
    assert full.final_lambda["unreachable"] > 1.0 and full.final_lambda["met"] == 0.0  # clipped at 0
    trl_log = json.loads((tmp_path / "full" / "checkpoint-4" / "trainer_state.json").read_text())
    trl_rewards = [h["reward"] for h in trl_log["log_history"] if "reward" in h]
    np.testing.assert_allclose(trl_rewards, [r["shaped_reward"] for r in rows], rtol=1e-5)
    # our token count agrees with TRL's own (prompt + completion tokens, one pass per batch)
    assert full.trained_tokens == trl_log["num_input_tokens_seen"]
    assert full.generated_tokens == sum(r["generated_tokens"] for r in rows)
    assert (full.model_dir / "adapter_model.safetensors").exists()

    # interrupted after 2 steps, then rerun to 4: λ, the window and the log come back from the
    # checkpoint, and the run continues exactly as the uninterrupted one
    part = _run(tok, tmp_path / "resumed", 2, resume=True)
    assert part.global_step == 2
    state = json.loads((tmp_path / "resumed" / "checkpoint-2" / STATE_FILE).read_text())
    assert state["lambda"][0] == pytest.approx(part.final_lambda["unreachable"]) and len(state["window"]) == 16
    resumed = _run(tok, tmp_path / "resumed", 4, resume=True)
    assert resumed.resumed_from.endswith("checkpoint-2") and not resumed.skipped
    again = _rows(tmp_path / "resumed" / LOG_FILE)
    assert again[2]["lambda_used"] == again[1]["lambda"] != {"unreachable": 1.0, "met": 1.0}
    assert again[2]["window_size"] == 24  # 16 restored + 8 new
    np.testing.assert_array_equal(resumed.lambda_history, full.lambda_history)
    np.testing.assert_allclose([r["kl"] for r in again], [r["kl"] for r in rows], rtol=1e-4, atol=1e-9)
    assert resumed.trained_tokens == full.trained_tokens

    # a rerun of the finished run trains nothing and loads the saved adapter
    done = _run(tok, tmp_path / "resumed", 4, resume=True)
    assert done.skipped and done.final_lambda == resumed.final_lambda
    np.testing.assert_array_equal(done.lambda_history, full.lambda_history)


def test_bad_targets_and_scorers_fail_before_training(tiny_tokenizer, tmp_path):
    from dualign.models.scorers import CallableScorer
    import toy_scorers

    tok = tiny_tokenizer
    model = make_tiny_llama(len(tok), seed=0)
    reward, safety = _scorers()
    cfg = PrimalDualConfig(safety_target={"unreachable": 2.0}, max_steps=1)
    with pytest.raises(InputError, match="field 'safety_target.met'"):
        train_primal_dual(model, tok, PROMPTS, reward, safety, cfg, out_dir=tmp_path)
    with pytest.raises(InputError, match="field 'safety_scorers.x'"):  # no declared sign
        train_primal_dual(model, tok, PROMPTS, reward, {"x": CallableScorer(toy_scorers.reward)},
                          PrimalDualConfig(max_steps=1), out_dir=tmp_path)
    with pytest.raises(InputError, match="record 1"):
        train_primal_dual(model, tok, ["ok", ""], reward, safety, PrimalDualConfig(max_steps=1), out_dir=tmp_path)
    with pytest.raises(InputError, match="field 'use_lora'"):  # TRL could not reload its reference
        train_primal_dual(model, tok, PROMPTS, reward, safety, PrimalDualConfig(max_steps=1, use_lora=False),
                          out_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


def test_full_fine_tune_saves_full_weights(tiny_tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from dualign.train import load_trained

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # TRL reloads π_ref from this path
    reward, safety = _scorers()
    cfg = PrimalDualConfig(use_lora=False, safety_target=2.0, max_steps=2, num_generations=2,
                           per_device_train_batch_size=4, max_new_tokens=6, save_steps=2, learning_rate=1e-3)
    res = train_primal_dual(policy, tiny_tokenizer, PROMPTS, reward, {"vowels": safety["met"]}, cfg,
                            out_dir=tmp_path)
    assert res.lambda_history.shape == (2, 1) and res.final_lambda["vowels"] > 1.0
    assert (res.model_dir / "model.safetensors").exists()
    trained, _ = load_trained(res.model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), base.parameters()))
    assert moved > 0  # the weights were trained, the reference file left as it was


def test_lambda_moves_once_per_generation_batch_with_num_iterations(tiny_tokenizer, tmp_path):
    """GRPO's μ = 2: each generation batch is trained on twice; λ steps on the new episodes
    only, and every pass counts in the trained tokens."""
    tok = tiny_tokenizer
    model = make_tiny_llama(len(tok), seed=0)
    cfg = PrimalDualConfig(safety_target=2.0, max_steps=4, num_iterations=2, num_generations=4,
                           per_device_train_batch_size=8, max_new_tokens=6, lora_r=4, lora_alpha=8,
                           save_steps=4, learning_rate=1e-2, beta=0.1)
    reward, safety = _scorers()
    res = train_primal_dual(model, tok, PROMPTS, reward, {"vowels": safety["met"]}, cfg, out_dir=tmp_path)
    rows = _rows(res.log_path)
    assert [r["episodes"] for r in rows] == [8, 0, 8, 0]
    for r in rows:
        moved = r["lambda"]["vowels"] != r["lambda_used"]["vowels"]
        assert moved == (r["episodes"] > 0) and r["kl"] is not None
    assert rows[1]["reward"] is None and rows[1]["lambda"] == rows[0]["lambda"]
    trl_state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert res.trained_tokens == 2 * trl_state["num_input_tokens_seen"]  # two passes per batch


def test_met_streak_counts_trailing_steps_with_a_full_window_meeting_every_target():
    from dualign.train.primal_dual import met_streak

    def row(slack, size=8):
        return {"window_size": size, "slack": slack}

    rows = [row({"a": 0.1, "b": 0.0}), row({"a": -0.1, "b": 0.2}), row({"a": 0.0, "b": 0.3}),
            row({"a": 0.2, "b": 0.1})]
    assert met_streak(rows, cost_window=8) == 2  # the second row misses "a"
    assert met_streak(rows[:1], cost_window=8) == 1
    assert met_streak(rows + [row({"a": 0.5, "b": 0.5}, size=4)], cost_window=8) == 0  # window not full yet
    assert met_streak(rows + [row({"a": None, "b": 0.5})], cost_window=8) == 0  # an empty window's mean
    assert met_streak([], cost_window=8) == 0


def test_stop_when_met_ends_the_loop_at_the_constraint_and_a_rerun_finds_it_finished(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    cfg = PrimalDualConfig(safety_target=-5.0, max_steps=6, stop_when_met=2, cost_window=8, num_generations=4,
                           per_device_train_batch_size=8, max_new_tokens=6, lora_r=4, lora_alpha=8,
                           save_steps=6, learning_rate=1e-2, beta=0.1)
    reward, safety = _scorers()
    res = train_primal_dual(make_tiny_llama(len(tok), seed=0), tok, PROMPTS, reward, {"vowels": safety["met"]},
                            cfg, out_dir=tmp_path)
    rows = _rows(res.log_path)
    # the target is met from the first full window (8 episodes = one step): stopped after 2 steps of 6
    assert [r["met_streak"] for r in rows] == [1, 2] and res.global_step == 2
    assert res.lambda_history.shape == (2, 1)
    again = train_primal_dual(make_tiny_llama(len(tok), seed=0), tok, PROMPTS, reward,
                              {"vowels": safety["met"]}, cfg, out_dir=tmp_path)
    assert again.global_step == 2 and again.final_lambda == res.final_lambda
    # never met: the whole budget, streak 0 throughout
    cfg_unmet = PrimalDualConfig(**{**cfg.to_dict(), "safety_target": 5.0})
    res = train_primal_dual(make_tiny_llama(len(tok), seed=0), tok, PROMPTS, reward, {"vowels": safety["met"]},
                            cfg_unmet, out_dir=tmp_path / "unmet")
    assert res.global_step == 6 and {r["met_streak"] for r in _rows(res.log_path)} == {0}
