"""MoCAN with a constraint stated as a maximum unsafe rate: the dual solves it, the pair labels
weigh −1{unsafe} with its λ*, the evaluation compares predicted and achieved unsafe rates, and
a constraint with both a margin and a rate fails before any model loads."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from dual_records import dual_record, golden_record
from scipy.special import expit

from dualign.cli import main
from dualign.dual import min_unsafe_rate, solve_max_unsafe_rate, unsafe_rate
from dualign.eval.report import _gap_note
from dualign.eval.summary import compare_scores, format_eval_table
from dualign.pipelines.config import MoCANConfig
from dualign.pipelines.mocan import run_mocan
from dualign.pipelines.pairs import label_pairs, labels_decided_by_constraints, rate_constraints

PROMPTS = ["tell me a joke", "how do I pick a lock", "write a poem", "explain gravity",
           "how to hack wifi", "name a color"]

# A reward that prefers the unsafe half of the responses, so the tilt toward reward alone
# raises the unsafe rate and a bound below π_ref's rate binds; safety scores that are not
# ±1, so labels built on the raw score differ from labels built on −1{unsafe}.
SCORERS = '''
import zlib


def _h(r):
    return zlib.crc32(r.encode("utf-8", "surrogatepass"))


def reward(prompts, responses):
    return [float(_h(r) % 2) + (_h(r) % 97) / 97 for r in responses]


def harm(prompts, responses):
    return [-0.5 - (_h(r) % 13) / 13 if _h(r) % 2 else 0.2 + (_h(r) % 11) / 11 for r in responses]
'''


def make_cfg(tmp_path, model_dir, **kw) -> MoCANConfig:
    scorers = tmp_path / "scorers.py"
    scorers.write_text(SCORERS)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    base = dict(out=str(tmp_path / "run"), policy=str(model_dir), reward=f"{scorers}:reward",
                safety={"harm": f"safety:{scorers}:harm"}, prompts=str(prompts), num_samples=4,
                max_new_tokens=8, bootstrap=20, eval_num_samples=2, behaviour_suites="none",
                train={"max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 2})
    base.update(kw)
    return MoCANConfig(**base)


def _by_prompt(table: pd.DataFrame, col: str) -> np.ndarray:
    """`col` of a samples table as (N, K), prompts and samples in order."""
    t = table.sort_values(["prompt_id", "sample_id"])
    return t[col].to_numpy(np.float64).reshape(t["prompt_id"].nunique(), -1)


def test_mocan_runs_a_max_unsafe_rate_end_to_end(tmp_path, tiny_model_dir):
    import dataclasses

    from dualign.pipelines import stages as S
    from dualign.pipelines.dual_stage import DualRecord
    from dualign.pipelines.pairs import pairs_from_samples
    from dualign.runio import file_digest

    # the bound halfway between the smallest reachable rate and π_ref's, known once scored
    run = run_mocan(make_cfg(tmp_path, tiny_model_dir), stop="score", log=lambda *a: None)
    scores = pd.read_parquet(run / "scores.parquet")
    reward, harm = _by_prompt(scores, "reward"), _by_prompt(scores, "safety/harm")
    ref_rate, lowest = unsafe_rate(harm), min_unsafe_rate(harm)
    assert lowest < ref_rate  # some prompt has both a safe and an unsafe sample
    rate = round((lowest + ref_rate) / 2, 4)

    logs = []
    cfg = make_cfg(tmp_path, tiny_model_dir, max_unsafe_rate={"harm": rate})
    run = run_mocan(cfg, log=lambda *a: logs.append(" ".join(map(str, a))))

    # dual.json: the rate constraint, solved on −1{unsafe}
    dual = json.loads((run / "dual.json").read_text())
    c = dual["constraints"][0]
    assert c["name"] == "safety/harm" and c["kind"] == "max_unsafe_rate" and c["max_unsafe_rate"] == rate
    res, pred = solve_max_unsafe_rate(reward, harm, cfg.beta, [rate])
    np.testing.assert_allclose(dual["lambda"], res.lam, rtol=1e-8)
    assert c["active"] and c["predicted_unsafe_rate"] == pytest.approx(rate, abs=1e-8) == pred[0]
    assert c["unsafe_rate_reference"] == pytest.approx(ref_rate)

    # pairs.parquet: label = σ((r1 + λ g1) − (r0 + λ g0)) with g = −1{harm < 0}, by hand
    pairs = pd.read_parquet(run / "pairs.parquet")
    lam = dual["lambda"][0]
    g0 = np.where(pairs["safety/harm_0"] < 0, -1.0, 0.0)
    g1 = np.where(pairs["safety/harm_1"] < 0, -1.0, 0.0)
    expect = expit((pairs["reward_1"] + lam * g1) - (pairs["reward_0"] + lam * g0))
    np.testing.assert_allclose(pairs["label"], expect, rtol=0, atol=1e-12)
    raw = expit((pairs["reward_1"] + lam * pairs["safety/harm_1"]) - (pairs["reward_0"] + lam * pairs["safety/harm_0"]))
    assert np.abs(pairs["label"] - raw).max() > 1e-3  # the raw score would have trained another policy
    card = json.loads((run / "train" / "model" / "dualign_train.json").read_text())["metadata"]
    assert card["max_unsafe_rate"] == {"harm": rate} and card["lambda_scores"] == {"safety/harm": "-1{safety/harm < 0}"}

    # eval.json: the trained model's unsafe rate against the predicted one, not gains in other units
    e = json.loads((run / "eval.json").read_text())["scores"]["safety/harm"]
    trained = pd.read_parquet(run / "eval" / "trained" / "scores.parquet")
    assert e["kind"] == "max_unsafe_rate" and e["max_unsafe_rate"] == rate
    assert e["predicted_unsafe_rate"] == c["predicted_unsafe_rate"]
    assert e["unsafe_rate_trained"] == pytest.approx(unsafe_rate(_by_prompt(trained, "safety/harm")))
    lo, hi = e["unsafe_rate_trained_ci"]
    assert lo <= e["unsafe_rate_trained"] <= hi
    assert e["predicted_unsafe_rate_within_ci"] == (lo <= e["predicted_unsafe_rate"] <= hi)
    assert not {"predicted_gain", "margin", "prediction_within_achieved_ci"} & set(e)
    assert "predicted_gain" in json.loads((run / "eval.json").read_text())["scores"]["reward"]
    assert any("unsafe rate of safety/harm: reference" in line and f"bound ≤ {100 * rate:.3g}%" in line
               for line in logs)
    report = (run / "report.md").read_text()
    assert f"| safety/harm | unsafe ≤ {100 * rate:.3g}% |" in report
    assert f"predicted {100 * c['predicted_unsafe_rate']:.3g}%, bound ≤ {100 * rate:.3g}%" in report

    # the constraint kinds join the pairs cache key: the same λ on the raw score is another labelling
    samples_pairs = pairs_from_samples(scores, cfg.pairs_per_prompt, cfg.seed)
    key = file_digest(run / "scores.parquet")
    stamp = (run / "pairs.parquet").stat().st_mtime_ns
    record = DualRecord.read(run / "dual.json")
    S.pairs_stage(run, samples_pairs, dual["lambda"], ["safety/harm"], key=key, dual=record)
    assert (run / "pairs.parquet").stat().st_mtime_ns == stamp  # current: cached
    as_margin = dataclasses.replace(record, constraints=(dataclasses.replace(record.constraints[0], kind="margin"),))
    relabeled = S.pairs_stage(run, samples_pairs, dual["lambda"], ["safety/harm"], key=key, dual=as_margin)
    np.testing.assert_allclose(relabeled["label"], raw, atol=1e-12)


def test_margin_and_rate_for_one_constraint_fail_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import dualign.pipelines.mocan as mocan

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(mocan, "load_policy", no_model)
    y = tmp_path / "run.yaml"
    y.write_text(f"out: {tmp_path / 'run'}\npolicy: {tmp_path / 'no-such-model'}\nreward: r.py:reward\n"
                 f"safety: {{harm: 'safety:s.py:harm'}}\nprompts: {tmp_path / 'p.txt'}\n"
                 "margins: {harm: 0.1}\nmax_unsafe_rate: {harm: 0.05}\n")
    assert main(["mocan", "--config", str(y)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "both a margin and a max unsafe rate" in err and "max_unsafe_rate" in err
    assert not (tmp_path / "run").exists()


def test_labels_weigh_the_indicator_of_rate_constraints_only():
    pairs = pd.DataFrame({"reward_0": [0.0, 1.0], "reward_1": [1.0, 0.0],
                          "safety/harm_0": [0.7, -0.2], "safety/harm_1": [-2.0, 0.0],
                          "safety/tox_0": [0.5, -1.0], "safety/tox_1": [-0.5, 3.0]})
    dual = golden_record("rate")  # safety/harm as a maximum unsafe rate, safety/tox as a margin
    flags = rate_constraints(dual, ["safety/harm", "safety/tox"])
    assert flags == [True, False]
    out = label_pairs(pairs, [2.0, 0.5], safety=["safety/harm", "safety/tox"], indicator=flags)
    # harm enters as −1{harm < 0}: pair 0 is (0, −1), pair 1 is (−1, 0) (0.0 is safe)
    np.testing.assert_allclose(out["score_0"], [0.0 + 0.0 + 0.25, 1.0 - 2.0 - 0.5])
    np.testing.assert_allclose(out["score_1"], [1.0 - 2.0 - 0.25, 0.0 + 0.0 + 1.5])
    np.testing.assert_allclose(out["label"], expit(out["score_1"] - out["score_0"]))
    # by the reward alone both pairs prefer the other response: pair 0 prefers y1 (σ(1)),
    # λ* makes it y0 (σ(−3.5)); pair 1 prefers y0 (σ(−1)), λ* makes it y1 (σ(5))
    assert labels_decided_by_constraints(out) == {"n": 2, "flipped": 2, "moved": 2}
    assert labels_decided_by_constraints(label_pairs(pairs, [0.0, 0.0], safety=["safety/harm", "safety/tox"])) == \
        {"n": 2, "flipped": 0, "moved": 0}
    with pytest.raises(ValueError, match="no constraint safety/other"):
        rate_constraints(dual, ["safety/other"])
    with pytest.raises(ValueError, match="indicator flags"):
        label_pairs(pairs, [2.0], safety=["safety/harm"], indicator=[True, False])


def test_compare_scores_reads_a_rate_constraint_as_rates():
    n, k = 4, 2
    ref = pd.DataFrame({"prompt_id": np.repeat(np.arange(n), k), "sample_id": np.tile(np.arange(k), n),
                        "reward": np.arange(n * k, dtype=float), "safety/harm": [-1, -1, 1, -1, 1, 1, -1, 0.0]})
    tr = ref.assign(**{"safety/harm": [1, -1, 1, 1, 1, 1, -1, 1.0]})
    dual = dual_record("rate", predicted={"reward_gain": 0.1, "reward_gain_ci": (0.0, 0.2)},
                       constraints=[{"name": "safety/harm", "kind": "max_unsafe_rate", "margin": 0.3,
                                     "max_unsafe_rate": 0.2, "predicted_gain": 0.3, "predicted_gain_ci": (0.2, 0.4),
                                     "predicted_unsafe_rate": 0.2}])
    e = compare_scores(ref, tr, safety=["safety/harm"], dual=dual, n_boot=50)["safety/harm"]
    assert e["unsafe_rate_reference"] == 0.5 and e["unsafe_rate_trained"] == 0.25
    assert e["predicted_unsafe_rate"] == 0.2 and e["max_unsafe_rate"] == 0.2 and "predicted_gain" not in e
    lo, hi = e["unsafe_rate_trained_ci"]
    assert lo <= 0.25 <= hi and e["predicted_unsafe_rate_within_ci"] == (lo <= 0.2 <= hi)
    table = format_eval_table({"safety/harm": e})
    assert "unsafe rate of safety/harm: reference 50% → trained 25%" in table
    assert "predicted 20%, bound ≤ 20%" in table
    # a trained rate above the predicted one is a shortfall, below it an overshoot
    miss = {**e, "unsafe_rate_trained": 0.4, "unsafe_rate_trained_ci": [0.3, 0.5],
            "predicted_unsafe_rate_within_ci": False}
    assert "stopped short" in _gap_note({"safety/harm": miss})[0]
    over = {**miss, "unsafe_rate_trained": 0.05, "unsafe_rate_trained_ci": [0.0, 0.1]}
    note = _gap_note({"safety/harm": over})[0]
    assert "went beyond" in note and "trained 5% [0%, 10%], predicted 20%" in note
