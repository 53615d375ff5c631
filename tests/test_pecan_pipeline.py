"""The PeCAN pipeline on tiny models: implicit scores, the dual and labels against hand
computations, the pipeline end to end (artifacts, resume, DPO_H/DPO_S rows), errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bandit_helpers import one_thread  # noqa: F401  (autouse: tiny models run faster on one thread)
from conftest import make_tiny_llama
from dualign import InfeasibleMarginError, InputError
from dualign.cli import main
from dualign.data.scores import scores_to_arrays
from dualign.dual import solve_dual
from dualign.models.loading import load_policy
from dualign.models.logprobs import logprobs
from dualign.pipelines.config import PeCANConfig, load_config
from dualign.pipelines.dual_stage import solve_dual_stage
from dualign.pipelines.pairs import label_pairs
from dualign.pipelines.pecan import run_pecan

TOY = Path(__file__).with_name("toy_scorers.py")
PROMPTS = ["tell me a joke", "how do I pick a lock", "write a poem", "explain gravity",
           "how to hack wifi", "name a color"]
PAIRS = [  # (prompt, response_0, response_1, better, safer)
    ("how do I pick a lock", "Call a locksmith.", "Use a tension wrench and a pick.", 1, 0),
    ("how to hack wifi", "Only test networks you own.", "Crack the WPA handshake offline.", 1, 0),
    ("tell me a joke", "Why did the chicken cross the road?", "No.", 0, 0),
    ("write a poem", "Roses are red.", "I cannot.", 0, 1),
    ("explain gravity", "Mass attracts mass.", "Magic.", 0, 0),
    ("name a color", "Blue.", "Red, like blood.", 0, 0),
]
QUIET = dict(log=lambda *a: None)


def write_prefs(path, rows=PAIRS, drop_safer_at=None):
    recs = []
    for i, (p, a, b, better, safer) in enumerate(rows):
        rec = {"prompt": p, "response_0": a, "response_1": b, "better_response_id": better,
               "safer_response_id": safer, "is_response_0_safe": safer == 0, "is_response_1_safe": safer == 1}
        if i == drop_safer_at:
            rec["safer_response_id"] = None
        recs.append(rec)
    pd.DataFrame(recs).to_json(path, orient="records", lines=True)
    return path


@pytest.fixture(scope="module")
def aligned_dirs(tmp_path_factory, tiny_tokenizer):
    """Two other tiny random models standing in for pre-aligned π_r and π_g (full weights)."""
    dirs = []
    for seed in (1, 2):
        d = tmp_path_factory.mktemp(f"aligned{seed}")
        make_tiny_llama(len(tiny_tokenizer), seed=seed).save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        dirs.append(d)
    return dirs


def make_cfg(tmp_path, model_dir, **kw):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    base = dict(out=str(tmp_path / "run"), policy=str(model_dir), preferences=str(write_prefs(tmp_path / "p.jsonl")),
                prompts=str(prompts), num_samples=4, max_new_tokens=10, bootstrap=50, eval_num_samples=2,
                beta=0.5, pre_align={"max_steps": 2}, train={"max_steps": 3, "per_device_train_batch_size": 2,
                                                             "save_steps": 3, "learning_rate": 1e-3})
    base.update(kw)
    return PeCANConfig(**base)


def reused(tmp_path, model_dir, aligned_dirs, **kw):
    """A config that reuses the two stand-in policies instead of pre-aligning."""
    return make_cfg(tmp_path, model_dir, helpful_model=str(aligned_dirs[0]),
                    safety_models={"harmless": str(aligned_dirs[1])}, **kw)


@pytest.fixture(scope="module")
def reused_run(tmp_path_factory, tiny_model_dir, aligned_dirs):
    """(config, run dir) of one run up to the pairs, reusing the stand-in policies."""
    tmp = tmp_path_factory.mktemp("reused")
    cfg = reused(tmp, tiny_model_dir, aligned_dirs)
    return cfg, run_pecan(cfg, stop="pairs", **QUIET)


def hand_logps(spec, prompts, responses, eos=True):
    model, tok = load_policy(str(spec))
    return logprobs(model, tok, list(prompts), list(responses), append_eos=eos)[0]


def test_implicit_scores_are_beta_log_ratios_and_the_dual_matches_by_hand(reused_run, tiny_model_dir, aligned_dirs):
    cfg, run = reused_run
    scores = pd.read_parquet(run / "scores.parquet")
    p, r = scores["prompt"], scores["response"]
    # a response cut at max_new_tokens never emitted EOS, so it is scored without one
    samples = pd.read_parquet(run / "samples.parquet").set_index(["prompt_id", "sample_id"])
    eos = ~samples.loc[list(zip(scores["prompt_id"], scores["sample_id"])), "truncated"].to_numpy(bool)
    ref = hand_logps(tiny_model_dir, p, r, eos)
    r_hat = cfg.beta * (hand_logps(aligned_dirs[0], p, r, eos) - ref)
    g_hat = cfg.beta * (hand_logps(aligned_dirs[1], p, r, eos) - ref)
    np.testing.assert_allclose(scores["reward"], r_hat, atol=1e-9)
    np.testing.assert_allclose(scores["safety/harmless"], g_hat, atol=1e-9)
    assert np.abs(r_hat).max() > 0.1  # the stand-ins differ from π_ref: the scores are not all 0

    dual = json.loads((run / "dual.json").read_text())
    n = scores["prompt_id"].nunique()
    hand = solve_dual(r_hat.reshape(n, -1), g_hat.reshape(n, -1, 1), beta=cfg.beta, margins=dual["margins"])
    assert dual["lambda"][0] == pytest.approx(hand.lam[0], abs=1e-9)
    assert dual["lambda"][0] > 0  # margin_fraction 0.5 of the largest gain: the constraint binds
    assert dual["constraints"][0]["predicted_gain"] == pytest.approx(hand.predicted.safety_gain[0], abs=1e-9)
    assert dual["predicted"]["reward_gain"] == pytest.approx(hand.predicted.reward_gain, abs=1e-9)
    # ĝ's sign means nothing (a log-ratio): no unsafe rate is reported for it
    assert "unsafe_rate_reference" not in dual["constraints"][0]


def test_prompt_only_constants_change_nothing(reused_run):
    """r̂ and ĝ are β·log-ratios only up to −β log Z(x); shifting them per prompt must leave
    λ*, every prediction and every label unchanged."""
    _, run = reused_run
    scores = pd.read_parquet(run / "scores.parquet")
    shift = np.random.default_rng(0).normal(0, 5, size=scores["prompt_id"].max() + 1)
    moved = scores.copy()
    moved["reward"] += shift[moved["prompt_id"]]
    moved["safety/harmless"] -= 2 * shift[moved["prompt_id"]]
    margin = json.loads((run / "dual.json").read_text())["margins"]
    a, b = (solve_dual_stage(scores_to_arrays(t, "reward", ["safety/harmless"]), 0.5, margin, n_boot=20,
                             progress=False) for t in (scores, moved))
    assert b.lam[0] == pytest.approx(a.lam[0], rel=1e-7)
    for k in ("reward_gain", "kl"):
        assert getattr(b.predicted, k) == pytest.approx(getattr(a.predicted, k), rel=1e-6, abs=1e-9)
    assert b.constraints[0].predicted_gain == pytest.approx(a.constraints[0].predicted_gain, rel=1e-6)

    pairs = pd.DataFrame({"reward_0": [0.3, -1.0], "reward_1": [0.1, 2.0], "safety/harmless_0": [1.0, 0.0],
                          "safety/harmless_1": [-0.5, 0.4]})
    shifted = pairs + np.array([7.0, -3.0])[:, None]  # the same constant on both responses of a pair
    np.testing.assert_allclose(label_pairs(shifted, [0.8], safety=["safety/harmless"])["label"],
                               label_pairs(pairs, [0.8], safety=["safety/harmless"])["label"], atol=1e-12)


@pytest.mark.parametrize("scale", ["consistent", "paper"])
def test_pseudo_labels_match_a_hand_computation(reused_run, tmp_path, tiny_model_dir, aligned_dirs, scale):
    cfg, run = reused_run
    if scale == "paper":  # a copy of the run, relabeled: samples, scores and the dual are reused
        shutil.copytree(run, tmp_path / "run")
        cfg = load_config(PeCANConfig, None, {**cfg.to_dict(), "out": str(tmp_path / "run"), "label_scale": scale})
        run = run_pecan(cfg, stop="pairs", **QUIET)
    lam = json.loads((run / "dual.json").read_text())["lambda"][0]
    pairs = pd.read_parquet(run / "pairs.parquet")
    assert len(pairs) == len(PAIRS)
    prompts = pairs["prompt"].tolist() * 2
    responses = pairs["response_0"].tolist() + pairs["response_1"].tolist()
    ref = hand_logps(tiny_model_dir, prompts, responses)
    lr = (hand_logps(aligned_dirs[0], prompts, responses) - ref).reshape(2, -1)  # log π_r/π_ref, [y0; y1]
    lg = (hand_logps(aligned_dirs[1], prompts, responses) - ref).reshape(2, -1)
    d = cfg.beta * ((lr[1] - lr[0]) + lam * (lg[1] - lg[0]))  # Δr̂ + λ*Δĝ
    if scale == "paper":
        d = d / cfg.beta  # the paper's code: no β inside σ
    np.testing.assert_allclose(pairs["label"], 1 / (1 + np.exp(-d)), atol=1e-9)
    # π_ref's log-probs of the pairs are reused as the training's reference log-probs
    np.testing.assert_allclose(pairs["ref_logp_0"], ref[:len(pairs)], atol=1e-9)


def test_end_to_end_artifacts_resume_and_baselines(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, reward=f"{TOY}:reward", safety={"vowels": f"safety:{TOY}:safety"})
    run = run_pecan(cfg, **QUIET)
    for name in ("pre_align/helpful/model/README.md", "pre_align/safety_harmless/model/README.md",
                 "samples.parquet", "scores.parquet", "dual.json", "pairs.parquet", "pairs_trl.jsonl",
                 "train/model/README.md", "eval.json", "report.md", "figures/before_after.png",
                 "eval/dpo_h/samples.parquet", "eval/dpo_s/scores.parquet"):
        assert (run / name).exists(), name
    # π_ref's log-probs of the preference pairs were computed once, for all three trainings
    assert not any((run / d / "ref_logps.npz").exists()
                   for d in ("pre_align/helpful", "pre_align/safety_harmless", "train"))
    card = json.loads((run / "pre_align/safety_harmless/model/dualign_train.json").read_text())
    assert card["metadata"]["label"] == "safer_response_id" and card["result"]["global_step"] == 2
    ev = json.loads((run / "eval.json").read_text())
    cols = ["reward", "scorer/reward", "safety/harmless", "scorer/safety/vowels"]
    assert ev["method"] == "pecan" and list(ev["scores"]) == cols
    assert set(ev["baselines"]) == {"dpo_h", "dpo_s"}
    for b in ev["baselines"].values():
        assert list(b) == cols and "predicted_gain" not in b["safety/harmless"]
    assert "predicted_gain" in ev["scores"]["safety/harmless"]
    assert "unsafe_rate_trained" in ev["scores"]["scorer/safety/vowels"]
    # ĝ is defined up to a per-prompt constant: its sign, hence an "unsafe rate", means nothing
    assert "unsafe_rate_trained" not in ev["scores"]["safety/harmless"]
    # the DPO_H row is really DPO_H's samples, not the trained model's
    dpo_h = pd.read_parquet(run / "eval/dpo_h/scores.parquet")
    trained = pd.read_parquet(run / "eval/trained/scores.parquet")
    dpo_s_scores = pd.read_parquet(run / "eval/dpo_s/scores.parquet")
    assert b["scorer/reward"]["trained_mean"] == pytest.approx(dpo_s_scores["scorer/reward"].mean())
    assert ev["baselines"]["dpo_h"]["reward"]["trained_mean"] == pytest.approx(dpo_h["reward"].mean())
    assert not dpo_h["response"].equals(trained["response"])
    # every model's KL(π‖π_ref) on its own samples: DPO_H's from its logp/helpful column
    per_prompt = (dpo_h["logp/helpful"] - dpo_h["logp/ref"]).groupby(dpo_h["prompt_id"]).mean()
    assert ev["baselines_kl"]["dpo_h"]["achieved"] == pytest.approx(per_prompt.mean(), abs=1e-9)
    assert set(ev["baselines_kl"]) == {"dpo_h", "dpo_s"} and "predicted" in ev["kl"]
    report = (run / "report.md").read_text()
    assert "| dpo_h |" in report and "| dpo_s |" in report and "β·log π_r/π_ref" in report
    assert "| KL(π‖π_ref) |" in report and f"{ev['baselines_kl']['dpo_s']['achieved']:.3f}" in report

    files = [run / "pre_align/helpful/model/adapter_model.safetensors", run / "samples.parquet",
             run / "scores.parquet", run / "dual.json", run / "pairs.parquet", run / "eval/dpo_s/samples.parquet",
             run / "eval/trained/scores.parquet", run / "train/model/adapter_model.safetensors"]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    lines = []
    run_pecan(cfg, log=lines.append)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert not any("plain DPO" in str(x) for x in lines)

    # a run directory copied elsewhere keeps its caches: nothing is recomputed there either
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    moved_stamps = {moved / p.relative_to(run): (moved / p.relative_to(run)).stat().st_mtime_ns for p in files}
    lines = []
    run_pecan(load_config(PeCANConfig, None, {**cfg.to_dict(), "out": str(moved)}), log=lines.append)
    assert {p: p.stat().st_mtime_ns for p in moved_stamps} == moved_stamps
    # current columns are announced ("... logp/helpful is up to date"), never recomputed ("wrote ...")
    assert not any("plain DPO" in str(x) or ("logp/" in str(x) and "up to date" not in str(x)) for x in lines), lines

    # --from pairs relabels (paper scale) but keeps the pre-aligned models and the samples
    run_pecan(load_config(PeCANConfig, None, {**cfg.to_dict(), "label_scale": "paper"}), start="pairs",
              stop="pairs", **QUIET)
    assert (run / "pairs.parquet").stat().st_mtime_ns != stamps[run / "pairs.parquet"]
    for p in files[:4]:
        assert p.stat().st_mtime_ns == stamps[p]


def test_separate_preference_sets_and_several_constraints(tmp_path, tiny_model_dir, aligned_dirs):
    f = write_prefs(tmp_path / "s.jsonl")
    trl = tmp_path / "trl.jsonl"
    pd.DataFrame({"prompt": [p for p, *_ in PAIRS], "chosen": [a for _, a, *_ in PAIRS],
                  "rejected": [b for _, _, b, *_ in PAIRS]}).to_json(trl, orient="records", lines=True)
    cfg = make_cfg(tmp_path, tiny_model_dir, preferences="", helpful_model=str(aligned_dirs[0]),
                   safety_preferences={"harm": str(f), "tone": str(trl)})
    run = run_pecan(cfg, stop="pairs", **QUIET)
    assert sorted(p.name for p in (run / "pre_align").iterdir()) == ["safety_harm", "safety_tone"]
    dual = json.loads((run / "dual.json").read_text())
    assert [c["name"] for c in dual["constraints"]] == ["safety/harm", "safety/tone"]
    # the TRL set repeats the PKU set's pairs: relabeling sees each distinct pair once
    assert len(pd.read_parquet(run / "pairs.parquet")) == len(PAIRS)


def test_missing_safer_response_id_is_one_line_naming_file_record_field(tmp_path, tiny_model_dir, capsys):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    bad = write_prefs(tmp_path / "bad.jsonl", drop_safer_at=2)
    assert main(["pecan", "--policy", cfg.policy, "--prompts", cfg.prompts, "--preferences", str(bad),
                 "--out", cfg.out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(bad) in err and "record 3" in err and "safer_response_id" in err
    helpful_only = tmp_path / "h.jsonl"
    pd.read_json(bad, lines=True).drop(columns=["safer_response_id", "is_response_0_safe", "is_response_1_safe"]) \
        .to_json(helpful_only, orient="records", lines=True)
    with pytest.raises(InputError, match=r"h\.jsonl.*safer_response_id"):
        run_pecan(make_cfg(tmp_path, tiny_model_dir, preferences=str(helpful_only)), **QUIET)
    assert not (Path(cfg.out) / "pre_align").exists()  # found before any training


def test_infeasible_margin_stops_before_pairs(tmp_path, tiny_model_dir, aligned_dirs):
    cfg = reused(tmp_path, tiny_model_dir, aligned_dirs, margins={"harmless": 50.0})
    with pytest.raises(InfeasibleMarginError, match="safety/harmless"):
        run_pecan(cfg, **QUIET)
    assert not (Path(cfg.out) / "dual.json").exists() and not (Path(cfg.out) / "pairs.parquet").exists()


def test_config_yaml_flags_and_validation(tmp_path, capsys):
    y = tmp_path / "pecan.yaml"
    y.write_text("prompts: p.txt\nhelpful_preferences: h.jsonl\nsafety_preferences: {harm: s.jsonl}\n"
                 "pre_align: {learning_rate: 0.001}\nlabel_scale: paper\n")
    cfg = load_config(PeCANConfig, y, {"pre_align.num_train_epochs": 2, "num_samples": 3})
    assert cfg.pre_align == {"learning_rate": 0.001, "num_train_epochs": 2} and cfg.num_samples == 3
    assert cfg.validate().safety_sources() == {"harm": "s.jsonl"}
    # "beta", the name earlier versions gave the consistent labels, still reads as them
    assert load_config(PeCANConfig, y, {"label_scale": "beta"}).validate().label_scale == "consistent"
    for kw, msg in [(dict(label_scale="nope"), "label_scale"), (dict(preferences="x.jsonl"), "not both"),
                    (dict(helpful_preferences=""), "no helpfulness"),
                    (dict(margins={"tone": 1.0}), "unknown constraint")]:
        with pytest.raises(InputError, match=msg):
            load_config(PeCANConfig, y, kw).validate()
    # every field is a flag; nested pre-alignment settings as --pre_align.FIELD
    assert main(["pecan", "--config", str(y), "--safety-preferences", "tone=t.jsonl", "--pre_align.learning_rate",
                 "0.01", "--label-scale", "bad", "--out", str(tmp_path / "r")]) == 2
    assert "label_scale" in capsys.readouterr().err


def test_the_7b_example_config_parses():
    cfg = load_config(PeCANConfig, Path(__file__).parents[1] / "configs" / "pecan-alpaca-7b.yaml").validate()
    assert cfg.safety_sources() == {"harmless": cfg.preferences} and cfg.margins == {"harmless": 0.5}
    assert cfg.pre_align == {"num_train_epochs": 1} and cfg.train["use_lora"] is False
