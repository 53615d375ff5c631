"""Constraints stated as a maximum unsafe rate: the indicator dual, its degenerate cases, the
predicted unsafe rate of π_λ*, the config field and `dualign dual --max-unsafe-rate`."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from scipy.special import expit, logit

from dualign import InfeasibleMarginError, InputError, solve_dual
from dualign.cli import main
from dualign.data.scores import ScoreArrays
from dualign.dual import (DualProblem, bootstrap_dual, is_unsafe, margin_for_unsafe_rate, min_unsafe_rate,
                          solve_max_unsafe_rate, unsafe_indicator, unsafe_rate, unsafe_rate_constraints)
from dualign.pipelines.dual_stage import format_dual_summary, solve_dual_stage

SAFE, UNSAFE = 1.0, -1.0


# ----------------------------------------------------------------------------- the rule and its pieces

def test_the_unsafe_rule_is_score_below_zero():
    s = np.array([[-1e-12, 0.0, 2.0], [-3.0, -0.5, 1e-300]])
    np.testing.assert_array_equal(is_unsafe(s), [[True, False, False], [True, True, False]])
    np.testing.assert_array_equal(unsafe_indicator(s), [[-1, 0, 0], [-1, -1, 0]])
    assert unsafe_rate(s) == pytest.approx(0.5)
    assert min_unsafe_rate(s) == 0.0
    assert min_unsafe_rate(np.array([[-1.0, -2.0], [1.0, -1.0]])) == 0.5
    s3 = np.stack([s, -s], axis=2)
    np.testing.assert_allclose(unsafe_rate(s3), [0.5, 2 / 6])


def test_weighted_unsafe_rate_is_mean_over_prompts_of_weighted_fractions():
    s = np.array([[SAFE, UNSAFE], [UNSAFE, UNSAFE]])
    w = np.array([[0.8, 0.2], [0.5, 0.5]])
    assert unsafe_rate(s, w) == pytest.approx((0.2 + 1.0) / 2)
    with pytest.raises(ValueError, match="weights"):
        unsafe_rate(s, w[:1])


def test_eval_and_dual_use_the_same_rule():
    """eval.json's unsafe rates (compare_scores) and dual.json's (unsafe_rate) agree on one table."""
    from dualign.eval.summary import compare_scores

    rng = np.random.default_rng(0)
    n, k = 7, 3
    table = pd.DataFrame({"prompt_id": np.repeat(np.arange(n), k), "sample_id": np.tile(np.arange(k), n),
                          "reward": rng.normal(size=n * k), "safety/harm": rng.normal(size=n * k)})
    table.loc[3, "safety/harm"] = 0.0  # exactly 0 is safe under both
    e = compare_scores(table, table, safety=["safety/harm"], n_boot=10)["safety/harm"]
    assert e["unsafe_rate_reference"] == pytest.approx(unsafe_rate(table["safety/harm"].to_numpy().reshape(n, k)))


# ----------------------------------------------------------------------------- hand-solved duals

@pytest.mark.parametrize("rate", [0.3, 0.1, 0.01, 0.6])
def test_one_prompt_two_samples_matches_closed_form(rate):
    """π_λ(unsafe) = σ((r1 − r0 − λ)/β), so the bound binds at λ = r1 − r0 − β·logit(rate).
    rate 0.6 is above π_ref's 0.5, and still binds: the reward favours the unsafe answer."""
    beta, r0, r1 = 0.5, 0.2, 1.0
    reward, safety = np.array([[r0, r1]]), np.array([[SAFE, UNSAFE]])
    res, pred = solve_max_unsafe_rate(reward, safety, beta, [rate])
    lam = r1 - r0 - beta * logit(rate)
    assert lam > 0 and res.converged
    assert res.lam[0] == pytest.approx(lam, abs=1e-6)
    assert pred[0] == pytest.approx(rate, abs=1e-9)
    assert expit((r1 - r0 - res.lam[0]) / beta) == pytest.approx(rate, abs=1e-9)
    # the same number read off the dual's own prediction: E_{π_λ*}[g] = −(unsafe rate)
    assert -(res.predicted.safety_gain[0] + unsafe_indicator(safety).mean()) == pytest.approx(rate, abs=1e-9)


def test_two_prompts_one_all_safe_matches_closed_form():
    """Prompt A: one safe (reward a0), one unsafe (a1); prompt B: both safe. Then the rate is
    ½σ((a1 − a0 − λ)/β), so λ* = a1 − a0 − β·logit(2r); π_ref's rate is 1/4."""
    beta, a0, a1, rate = 0.3, -0.4, 0.7, 0.1
    reward = np.array([[a0, a1], [0.0, 2.0]])
    safety = np.array([[SAFE, UNSAFE], [SAFE, 3.0]])
    assert margin_for_unsafe_rate(safety, rate) == pytest.approx(0.25 - rate)
    res, pred = solve_max_unsafe_rate(reward, safety, beta, [rate])
    assert res.lam[0] == pytest.approx(a1 - a0 - beta * logit(2 * rate), abs=1e-6)
    assert pred[0] == pytest.approx(rate, abs=1e-9)


def test_two_mixed_prompts_match_a_scalar_root():
    beta, rate = 0.2, 0.15
    reward = np.array([[0.0, 0.5], [1.0, 0.3]])     # A: unsafe sample preferred; B: unsafe one second
    safety = np.array([[SAFE, UNSAFE], [UNSAFE, SAFE]])
    rate_of = lambda lam: 0.5 * (expit((0.5 - 0.0 - lam) / beta) + expit((1.0 - 0.3 - lam) / beta))  # noqa: E731
    lam = brentq(lambda x: rate_of(x) - rate, 0.0, 10.0, xtol=1e-14)
    res, pred = solve_max_unsafe_rate(reward, safety, beta, rate)
    assert res.lam[0] == pytest.approx(lam, abs=1e-6)
    assert pred[0] == pytest.approx(rate, abs=1e-9)


def test_indicator_dual_with_ties_and_other_constraints():
    """K = 4 with tied rewards and prompts that are all safe / all unsafe (their ∇ and ∇² terms
    are exactly 0), next to an ordinary margin constraint."""
    rng = np.random.default_rng(3)
    n, k = 40, 4
    reward = np.round(rng.normal(size=(n, k)), 1)       # many ties
    harm = rng.choice([SAFE, UNSAFE], size=(n, k), p=[0.6, 0.4])
    harm[:5] = SAFE
    harm[5:8] = UNSAFE
    other = rng.normal(size=(n, k))
    safety = np.stack([harm, other], axis=2)
    rate = 0.5 * (unsafe_rate(harm) + min_unsafe_rate(harm))
    res, pred = solve_max_unsafe_rate(reward, safety, 0.1, [rate, None], margins=[0.0, 0.1], names=["harm", "other"])
    assert res.converged and res.lam[0] > 0
    assert pred[0] == pytest.approx(rate, abs=1e-8)
    # the same as solve_dual on the indicator with the computed margin
    G, b, absolute = unsafe_rate_constraints(safety, [0.0, 0.1], [rate, None])
    assert absolute.tolist() == [True, False] and b[1] == 0.1
    np.testing.assert_allclose(solve_dual(reward, G, 0.1, b).lam, res.lam, rtol=1e-9)


def test_predicted_unsafe_rate_of_a_margin_constraint_uses_the_same_weights():
    rng = np.random.default_rng(1)
    reward, safety = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    res, pred = solve_max_unsafe_rate(reward, safety, 0.2, [None], margins=0.3)
    z = (reward + res.lam[0] * safety) / 0.2
    w = np.exp(z - z.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    assert pred[0] == pytest.approx(np.mean((w * (safety < 0)).sum(axis=1)), abs=1e-12)
    assert pred[0] < unsafe_rate(safety)  # a safety gain lowers the unsafe rate here


# ----------------------------------------------------------------------------- degenerate cases

@pytest.mark.parametrize("rate", [0.0, 0.05, 1.0])
def test_all_samples_safe_is_inactive(rate):
    rng = np.random.default_rng(0)
    reward, safety = rng.normal(size=(6, 3)), np.abs(rng.normal(size=(6, 3)))
    assert margin_for_unsafe_rate(safety, rate) == pytest.approx(-rate)
    res, pred = solve_max_unsafe_rate(reward, safety, 0.1, [rate])
    assert res.lam.tolist() == [0.0] and res.converged and pred[0] == 0.0
    # with another, binding constraint the flat one stays at 0 (it has nothing to push on)
    other = -reward + 0.1 * rng.normal(size=(6, 3))  # opposes the reward: binds
    both, _ = solve_max_unsafe_rate(reward, np.stack([safety, other], 2), 0.1, [rate, None],
                                    margins=[0.0, 0.5 * DualProblem(reward, other, 0.1).max_gain()[0]])
    assert both.converged and both.lam[0] == 0.0 and both.lam[1] > 0


def test_all_safe_dual_record_says_inactive():
    rng = np.random.default_rng(0)
    scores = ScoreArrays(rng.normal(size=(8, 4)), np.abs(rng.normal(size=(8, 4, 1))), ["safety/harm"], np.arange(8))
    d = solve_dual_stage(scores, 0.1, [0.0], n_boot=20, progress=False, max_unsafe_rate=[0.0])
    c = d.constraints[0]
    assert c.lam == 0.0 and not c.active and c.predicted_unsafe_rate == 0.0
    assert d.bootstrap["n_infeasible"] == 0
    assert "every sample is safe" in format_dual_summary(d)


def test_rate_pi_ref_meets_is_inactive_when_the_reward_does_not_favour_unsafe():
    reward = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 1.0]])
    safety = np.array([[SAFE, UNSAFE, SAFE], [SAFE, SAFE, UNSAFE]])   # π_ref: 1/3 unsafe
    for rate in (1 / 3, 0.5):
        res, pred = solve_max_unsafe_rate(reward, safety, 0.5, [rate])
        assert res.lam.tolist() == [0.0] and res.converged and pred[0] <= rate
    d = solve_dual_stage(ScoreArrays(reward, safety[:, :, None], ["harm"], np.arange(2)), 0.5, [0.0],
                         n_boot=10, progress=False, max_unsafe_rate=[0.5])
    assert "meets ≤ 50%, and so does π_λ*: inactive" in format_dual_summary(d)


def test_rate_pi_ref_meets_can_still_bind():
    """λ = 0 is the reward tilt, not π_ref: when the reward favours the unsafe answer, π_0 is
    less safe than π_ref and a bound π_ref meets binds."""
    reward, safety = np.array([[0.0, 1.0]]), np.array([[SAFE, UNSAFE]])
    res, pred = solve_max_unsafe_rate(reward, safety, 0.5, [0.6])
    assert margin_for_unsafe_rate(safety, 0.6) < 0 < res.lam[0]
    assert pred[0] == pytest.approx(0.6, abs=1e-9)
    d = solve_dual_stage(ScoreArrays(reward, safety[:, :, None], ["harm"], np.arange(1)), 0.5, [0.0],
                         n_boot=5, progress=False, max_unsafe_rate=[0.6])
    assert "meets ≤ 60%, but" in format_dual_summary(d)


def test_equal_rewards_at_the_reference_rate_give_exactly_zero_gradient():
    reward = np.zeros((4, 4))
    safety = np.array([[SAFE, UNSAFE, SAFE, SAFE]] * 4)
    res, pred = solve_max_unsafe_rate(reward, safety, 0.1, [0.25])
    assert res.lam.tolist() == [0.0] and res.converged and res.iterations == 0
    assert pred[0] == pytest.approx(0.25)


def test_unreachable_rate_names_the_smallest_reachable():
    reward = np.zeros((4, 2))
    safety = np.array([[UNSAFE, UNSAFE], [SAFE, UNSAFE], [SAFE, UNSAFE], [SAFE, SAFE]])  # 1 of 4 hopeless
    assert min_unsafe_rate(safety) == 0.25
    for rate in (0.0, 0.1, 0.25):
        with pytest.raises(InfeasibleMarginError, match="smallest unsafe rate reachable on these samples is 0.25") \
                as ei:
            solve_max_unsafe_rate(reward, safety, 0.1, [rate], names=["harm"])
        assert ei.value.min_unsafe_rate == 0.25 and ei.value.constraint == "harm"
        assert "1 of 4 prompts have no safe sample" in str(ei.value)
    res, pred = solve_max_unsafe_rate(reward, safety, 0.1, [0.26])  # just above: reachable
    assert res.converged and pred[0] == pytest.approx(0.26, abs=1e-8)


def test_no_mixed_prompt_means_no_reweighting_moves_the_rate():
    safety = np.array([[UNSAFE, UNSAFE], [SAFE, SAFE]])
    with pytest.raises(InfeasibleMarginError, match="no reweighting changes the unsafe rate 0.5"):
        margin_for_unsafe_rate(safety, 0.4)
    res, pred = solve_max_unsafe_rate(np.zeros((2, 2)), safety, 0.1, [0.5])  # exactly π_ref's: vacuous
    assert res.lam.tolist() == [0.0] and pred[0] == 0.5


@pytest.mark.parametrize("rate", [-0.01, 1.5, float("nan"), float("inf"), "abc", None, True])
def test_rate_out_of_range_is_input_error(rate):
    with pytest.raises(InputError, match="max_unsafe_rate"):
        margin_for_unsafe_rate(np.array([[SAFE, UNSAFE]]), rate, "harm")


def test_bootstrap_holds_a_rate_bound_absolute():
    """Each replicate bounds the rate by the same r (its margin moves with its own π_ref rate)."""
    rng = np.random.default_rng(2)
    n, k, rate = 50, 4, 0.2
    reward = rng.normal(size=(n, k))
    safety = np.where(rng.random((n, k)) < 0.35, UNSAFE, SAFE)
    G, b, absolute = unsafe_rate_constraints(safety, 0.0, rate)
    bs = bootstrap_dual(reward, G, 0.1, b, n_boot=1, seed=7, absolute=absolute)
    idx = np.random.default_rng(7).integers(0, n, size=n)
    direct, pred = solve_max_unsafe_rate(reward[idx], safety[idx], 0.1, [rate])
    assert pred[0] == pytest.approx(rate, abs=1e-8)
    np.testing.assert_allclose(bs.replicates["lambda"][0], direct.lam, rtol=1e-7)


def test_dual_stage_rejects_rates_on_unsigned_scores_and_both_margin_and_rate(tmp_path):
    from dualign.pipelines.config import MoCANConfig
    from dualign.pipelines.stages import dual_stage, resolve_margins

    scores = ScoreArrays(np.zeros((2, 2)), np.array([[[SAFE], [UNSAFE]]] * 2), ["safety/harm"], np.arange(2))
    with pytest.raises(InputError, match="no meaningful sign"):
        solve_dual_stage(scores, 0.1, [0.0], n_boot=5, progress=False, sign_means_unsafe=False, max_unsafe_rate=[0.1])
    with pytest.raises(InputError, match="both a margin and a max_unsafe_rate"):
        resolve_margins(scores, 0.1, {"harm": 0.1}, 0.5, {"harm": 0.1})
    assert resolve_margins(scores, 0.1, {}, 0.5, {"harm": 0.2}) == [pytest.approx(0.3)]
    with pytest.raises(InputError, match="no meaningful sign"):
        dual_stage(tmp_path, None, ["safety/harm"], MoCANConfig(beta=0.1, bootstrap=5, max_unsafe_rate={"harm": 0.1}),
                   sign_means_unsafe=False)


def test_pipeline_dual_stage_solves_a_rate(tmp_path):
    from dualign.pipelines.config import MoCANConfig
    from dualign.pipelines.stages import dual_stage

    def settings(rate):
        return MoCANConfig(beta=0.1, margin_fraction=0.5, bootstrap=20, seed=0, max_unsafe_rate={"harm": rate})

    rng = np.random.default_rng(4)
    n, k = 30, 4
    table = pd.DataFrame({"prompt_id": np.repeat(np.arange(n), k), "sample_id": np.tile(np.arange(k), n),
                          "reward": rng.normal(size=n * k),
                          "safety/harm": rng.normal(0.3, 1.0, size=n * k)})
    logs = []
    d = dual_stage(tmp_path, table, ["safety/harm"], settings(0.2), log=logs.append)
    c = d.constraints[0]
    assert c.kind == "max_unsafe_rate" and c.active and c.predicted_unsafe_rate == pytest.approx(0.2)
    assert d.predicted.unsafe_rate["safety/harm"] == pytest.approx(0.2)
    assert any(line.startswith("max unsafe rate for safety/harm: 0.2") for line in logs)
    assert json.loads((tmp_path / "dual.json").read_text())["lambda"] == list(d.lam)
    # a rerun with the same rate is cached; another rate is not
    again = []
    dual_stage(tmp_path, table, ["safety/harm"], settings(0.2), log=again.append)
    assert not any(line.startswith("max unsafe rate") for line in again)
    other = dual_stage(tmp_path, table, ["safety/harm"], settings(0.25), log=lambda _: None)
    assert other.constraints[0].predicted_unsafe_rate == pytest.approx(0.25)


# ----------------------------------------------------------------------------- config

def _mocan(**kw):
    from dualign.pipelines.config import MoCANConfig

    return MoCANConfig(prompts="p.jsonl", reward="r", safety={"harm": "cost:c", "privacy": "cost:d"}, **kw)


@pytest.mark.parametrize("kw,expect", [
    (dict(max_unsafe_rate={"violence": 0.1}), "unknown constraint"),
    (dict(max_unsafe_rate={"harm": 0.1}, margins={"harm": 0.2}), "both a margin and a max unsafe rate"),
    (dict(max_unsafe_rate={"harm": 1.2}), "must be a rate in [0, 1]"),
    (dict(max_unsafe_rate={"harm": "lots"}), "must be a rate in [0, 1]"),
    (dict(max_unsafe_rate=0.05), "expected a mapping"),
])
def test_config_validation(kw, expect):
    with pytest.raises(InputError, match="max_unsafe_rate") as ei:
        _mocan(**kw).validate()
    assert expect in str(ei.value)


def test_config_valid_rates_pass_checks():
    cfg = _mocan(max_unsafe_rate={"harm": 0.05}, margins={"privacy": 0.1})
    assert cfg.validate() is cfg
    assert _mocan().validate().max_unsafe_rate == {}


def test_pecan_rejects_max_unsafe_rate():
    from dualign.pipelines.config import PeCANConfig

    cfg = PeCANConfig(prompts="p.jsonl", preferences="prefs.jsonl", max_unsafe_rate={"harmless": 0.05})
    with pytest.raises(InputError, match="no meaningful sign"):
        cfg.validate()


def test_config_file_and_flags_parse_rates(tmp_path):
    import argparse

    from dualign.pipelines.config import MoCANConfig, add_config_flags, load_config, overrides_from_args

    path = tmp_path / "run.yaml"
    path.write_text("max_unsafe_rate: {harm: 0.05}\n")
    assert load_config(MoCANConfig, path).max_unsafe_rate == {"harm": 0.05}
    parser = argparse.ArgumentParser()
    add_config_flags(parser, MoCANConfig)
    args, extra = parser.parse_known_args(["--max-unsafe-rate", "harm=0.05"])
    assert overrides_from_args(args, extra, MoCANConfig.NESTED)["max_unsafe_rate"] == {"harm": 0.05}
    assert "unsafe" in parser.format_help()


# ----------------------------------------------------------------------------- CLI

@pytest.fixture
def csv_file(tmp_path):
    rng = np.random.default_rng(5)
    n, k = 40, 6
    reward = rng.normal(size=(n, k))
    harm = rng.normal(0.4, 1.0, size=(n, k)) - 0.3 * reward   # reward leans unsafe
    df = pd.DataFrame({"prompt_id": np.repeat(np.arange(n), k), "sample_id": np.tile(np.arange(k), n),
                       "reward": reward.ravel(), "safety/harm": harm.ravel(),
                       "safety/privacy": rng.normal(size=n * k)})
    path = tmp_path / "scores.csv"
    df.to_csv(path, index=False)
    return path, reward, harm


def test_cli_max_unsafe_rate_one_column(csv_file, tmp_path, capsys):
    path, reward, harm = csv_file
    out = tmp_path / "dual.json"
    rc = main(["dual", str(path), "--safety", "safety/harm", "--max-unsafe-rate", "0.1", "--bootstrap", "20",
               "--out", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    c = d["constraints"][0]
    res, pred = solve_max_unsafe_rate(reward, harm, 0.1, [0.1])
    np.testing.assert_allclose(d["lambda"], res.lam, rtol=1e-10)
    assert c["kind"] == "max_unsafe_rate" and c["max_unsafe_rate"] == 0.1
    assert c["unsafe_rate_reference"] == pytest.approx(np.mean(harm < 0))
    assert c["predicted_unsafe_rate"] == pytest.approx(0.1, abs=1e-8) == d["predicted"]["unsafe_rate"]["safety/harm"]
    assert c["margin"] == pytest.approx(np.mean(harm < 0) - 0.1)
    text = capsys.readouterr().out
    assert "unsafe rate (score < 0)" in text and "≤ 10%" in text


def test_cli_rate_and_margin_on_different_columns(csv_file, tmp_path):
    path, _, _ = csv_file
    out = tmp_path / "dual.json"
    assert main(["dual", str(path), "--max-unsafe-rate", "harm=0.15", "--margin", "0.05", "--bootstrap", "10",
                 "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    harm, privacy = d["constraints"]
    assert harm["kind"] == "max_unsafe_rate" and privacy["kind"] == "margin" and privacy["margin"] == 0.05
    assert set(d["predicted"]["unsafe_rate"]) == {"safety/harm", "safety/privacy"}


@pytest.mark.parametrize("flags,expect", [
    (["--safety", "safety/harm", "--max-unsafe-rate", "1.5"], "must be a rate in [0, 1]"),
    (["--safety", "safety/harm", "--max-unsafe-rate", "five"], "must be a rate in [0, 1]"),
    (["--max-unsafe-rate", "0.1"], "give NAME=R"),
    (["--max-unsafe-rate", "violence=0.1"], "no safety column 'violence'"),
    (["--safety", "safety/harm", "--max-unsafe-rate", "0.1", "--margin", "0.1"], "both --margin and"),
    (["--safety", "safety/harm", "--max-unsafe-rate", "0"], "smallest unsafe rate reachable"),
])
def test_cli_bad_rate_is_one_line_exit_2(csv_file, tmp_path, capsys, flags, expect):
    path, _, _ = csv_file
    out = tmp_path / "dual.json"
    rc = main(["dual", str(path), "--bootstrap", "5", "--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err
    assert not out.exists()


def test_summary_explains_a_bound_the_reward_tilt_already_meets():
    """π_ref is 50% unsafe, but the reward prefers the safe answer: π_0 is within 20% already."""
    reward, safety = np.array([[1.0, 0.0]]), np.array([[SAFE, UNSAFE]])
    d = solve_dual_stage(ScoreArrays(reward, safety[:, :, None], ["harm"], np.arange(1)), 0.2, [0.0],
                         n_boot=5, progress=False, max_unsafe_rate=[0.2])
    assert list(d.lam) == [0.0] and d.constraints[0].predicted_unsafe_rate == pytest.approx(expit(-5))
    assert "π_ref's 50% exceeds 20%, but tilting toward reward already meets it" in format_dual_summary(d)
