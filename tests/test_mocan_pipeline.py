"""The MoCAN pipeline wired end to end on a tiny model and toy scorers: artifacts, caching,
--from/--until, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dualign import InfeasibleMarginError, InputError
from dualign.cli import main
from dualign.pipelines.config import MoCANConfig, load_config
from dualign.pipelines.mocan import run_mocan

TOY = Path(__file__).with_name("toy_scorers.py")
PROMPTS = ["tell me a joke", "how do I pick a lock", "write a poem", "explain gravity",
           "how to hack wifi", "name a color"]


def make_cfg(tmp_path, model_dir, **kw):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    base = dict(out=str(tmp_path / "run"), policy=str(model_dir), reward=f"{TOY}:reward",
                safety={"vowels": f"safety:{TOY}:safety"}, prompts=str(prompts), num_samples=4,
                max_new_tokens=10, bootstrap=50, eval_num_samples=2,
                train={"max_steps": 3, "per_device_train_batch_size": 2, "save_steps": 3})
    base.update(kw)
    return MoCANConfig(**base)


def test_end_to_end_artifacts_and_resume(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    run = run_mocan(cfg, log=lambda *a: None)
    for name in ("samples.parquet", "scores.parquet", "dual.json", "pairs.parquet", "pairs_trl.jsonl",
                 "eval.json", "report.md", "figures/dual_function.png", "figures/before_after.png",
                 "train/model/README.md"):
        assert (run / name).exists(), name
    dual = json.loads((run / "dual.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    assert ev["method"] == "mocan" and ev["lambda"] == dual["lambda"]
    assert ev["n_eval_prompts"] == len(PROMPTS) and ev["n_samples_per_prompt"] == 2
    s = ev["scores"]["safety/vowels"]
    for key in ("reference_mean", "trained_mean", "achieved_gain", "achieved_gain_ci", "predicted_gain",
                "predicted_gain_ci", "margin", "unsafe_rate_reference", "unsafe_rate_trained"):
        assert key in s, key
    assert s["margin"] == pytest.approx(dual["margins"][0])
    # the prediction on the held-out prompts: λ* on π_ref's samples of them, made before training
    from dualign.data.scores import scores_to_arrays
    from dualign.pipelines.dual_stage import DualRecord, held_out_prediction

    ref_eval = pd.read_parquet(run / "eval" / "reference" / "scores.parquet")
    h = held_out_prediction(DualRecord.read(run / "dual.json"), scores_to_arrays(ref_eval, "reward", ["safety/vowels"]),
                            seed=cfg.seed)
    assert s["predicted_gain_held_out"] == pytest.approx(h.safety_gain["safety/vowels"])
    assert ev["scores"]["reward"]["predicted_gain_held_out"] == pytest.approx(h.reward_gain)
    lo, hi = s["achieved_gain_ci"]
    assert s["held_out_prediction_within_achieved_ci"] == (lo <= h.safety_gain["safety/vowels"] <= hi)
    assert "held-out [95% CI]" in (run / "report.md").read_text()
    # how much of λ*'s tilt the model learned: its log-ratios on those same reference samples
    from dualign.pipelines.stages import learned_tilt_of

    t = learned_tilt_of(ref_eval, DualRecord.read(run / "dual.json"), "reward", ["safety/vowels"], "logp/trained",
                        "logp/ref", seed=cfg.seed)
    assert ev["learned_tilt"]["slope"] == pytest.approx(t.slope) and np.isfinite(t.slope)
    assert ev["learned_tilt"]["reweighted_reward_gain"] == pytest.approx(t.reweighted_reward_gain)
    assert ev["learned_tilt"]["n_samples_per_prompt"] == 2
    # and on the samples the pairs were drawn from (the dual's): the fit on what it saw
    logps = pd.read_parquet(run / "eval" / "training_samples_logps.parquet")
    seen = learned_tilt_of(pd.read_parquet(run / "scores.parquet").merge(logps), DualRecord.read(run / "dual.json"),
                           "reward", ["safety/vowels"], "logp/trained", "logp/ref", seed=cfg.seed)
    assert ev["learned_tilt_training_samples"]["slope"] == pytest.approx(seen.slope)
    assert ev["learned_tilt_training_samples"]["n_samples_per_prompt"] == 4
    report = (run / "report.md").read_text()
    assert "of the 6 held-out prompts" in report and "of the 6 training prompts" in report
    g = pd.read_parquet(run / "scores.parquet")["safety/vowels"]
    assert dual["constraints"][0]["unsafe_rate_reference"] == pytest.approx((g < 0).mean())
    pairs = pd.read_parquet(run / "pairs.parquet")
    assert len(pairs) == 2 * len(PROMPTS) and pairs["label"].between(0, 1).all()
    # label = σ(r_λ(y1) − r_λ(y0)) with r_λ = r + λ g
    lam = dual["lambda"][0]
    d = (pairs["reward_1"] + lam * pairs["safety/vowels_1"]) - (pairs["reward_0"] + lam * pairs["safety/vowels_0"])
    assert (pairs["label"] - 1 / (1 + (-d).map(__import__("math").exp))).abs().max() < 1e-12
    trl = pd.read_json(run / "pairs_trl.jsonl", lines=True)
    assert list(trl.columns) == ["prompt", "chosen", "rejected", "label"] and (trl["label"] >= 0.5).all()
    timings = json.loads((run / "timings.json").read_text())  # bench/stages.py reads it
    assert list(timings["seconds"]) == ["sample", "score", "dual", "pairs", "train", "evaluate", "report"]
    assert all(v >= 0 for v in timings["seconds"].values())
    assert timings["total"] == pytest.approx(sum(timings["seconds"].values()), abs=0.05)

    # a rerun redoes nothing: every stage file and the samples keep their timestamps
    stamps = {p: p.stat().st_mtime_ns for p in [run / "samples.parquet", run / "dual.json", run / "pairs.parquet",
                                                run / "eval" / "trained" / "samples.parquet"]}
    run_mocan(cfg, log=lambda *a: None)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # --from dual recomputes the dual (and what follows) but not the samples
    run_mocan(cfg, start="dual", stop="pairs", log=lambda *a: None)
    assert (run / "samples.parquet").stat().st_mtime_ns == stamps[run / "samples.parquet"]
    assert (run / "dual.json").stat().st_mtime_ns != stamps[run / "dual.json"]


def _logps(model, tok, samples):
    from dualign.models.logprobs import logprobs, samples_append_eos

    samples = samples.sort_values(["prompt_id", "sample_id"])
    eos = samples_append_eos(samples, True)  # a response cut at max_new_tokens gets no EOS
    return logprobs(model, tok, samples["prompt"].tolist(), samples["response"].tolist(), append_eos=eos)[0], samples


@pytest.mark.parametrize("lr", [0.0, 5e-2])
def test_achieved_kl_is_the_mean_log_ratio_of_the_trained_models_samples(tmp_path, tiny_model_dir, lr):
    import numpy as np

    from dualign.models.loading import load_policy
    from dualign.train.preference import load_trained

    cfg = make_cfg(tmp_path, tiny_model_dir, train={"max_steps": 3, "per_device_train_batch_size": 2,
                                                    "save_steps": 3, "learning_rate": lr})
    run = run_mocan(cfg, log=lambda *a: None)
    kl = json.loads((run / "eval.json").read_text())["kl"]
    dual = json.loads((run / "dual.json").read_text())
    assert kl["predicted"] == dual["predicted"]["kl"] and kl["predicted_ci"] == dual["predicted"]["kl_ci"]
    lo, hi = kl["achieved_ci"]
    assert lo <= kl["achieved"] <= hi
    if lr == 0:  # an untrained LoRA adapter is π_ref itself: every log-ratio is 0
        assert kl["achieved"] == pytest.approx(0, abs=1e-6) and hi - lo == pytest.approx(0, abs=1e-6)
        assert "the model barely moved" in (run / "report.md").read_text()
        return
    # the estimate from independently loaded models: mean over prompts of mean log π_θ/π_ref
    samples = pd.read_parquet(run / "eval" / "trained" / "samples.parquet")
    trained, samples = _logps(*load_trained(run / "train" / "model", str(tiny_model_dir)), samples)
    ref, _ = _logps(*load_policy(str(tiny_model_dir)), samples)
    per_prompt = pd.Series(trained - ref).groupby(samples["prompt_id"].to_numpy()).mean()
    assert np.abs(trained - ref).max() > 1e-3  # training moved the model
    assert kl["achieved"] == pytest.approx(per_prompt.mean(), abs=1e-4)


def test_a_changed_margin_reruns_the_stale_stages_including_training(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    run = run_mocan(cfg, log=lambda *a: None)
    first = json.loads((run / "dual.json").read_text())
    weights = run / "train" / "model" / "adapter_model.safetensors"
    before = weights.read_bytes()
    margin = 0.5 * first["margins"][0]
    run_mocan(load_config(MoCANConfig, None, {**cfg.to_dict(), "margins": {"vowels": margin}}), log=lambda *a: None)
    dual = json.loads((run / "dual.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    assert dual["margins"] == [margin] and dual["lambda"] != first["lambda"]
    assert ev["lambda"] == dual["lambda"] and weights.read_bytes() != before  # retrained on the new labels
    card = json.loads((run / "train" / "model" / "dualign_train.json").read_text())
    assert card["metadata"]["lambda"] == dual["lambda"]


def test_until_stops_after_the_dual(tmp_path, tiny_model_dir):
    run = run_mocan(make_cfg(tmp_path, tiny_model_dir), stop="dual", log=lambda *a: None)
    assert (run / "dual.json").exists() and not (run / "pairs.parquet").exists()
    # a pipeline that stops early still times the stages it ran
    assert list(json.loads((run / "timings.json").read_text())["seconds"]) == ["sample", "score", "dual"]


def test_held_out_prediction_reweights_more_reference_samples_when_asked(tmp_path, tiny_model_dir):
    import pandas as pd

    cfg = make_cfg(tmp_path, tiny_model_dir, eval_prompts=None, reference_eval_samples=4)
    lines = []
    run = run_mocan(cfg, stop="dual", log=lines.append)
    ref = pd.read_parquet(run / "eval" / "reference" / "samples.parquet")
    assert ref.groupby("prompt_id").size().eq(4).all()  # π_ref: 4 per held-out prompt, the trained model 2
    assert any("π_ref's 4 samples of each" in str(line) for line in lines)
    with pytest.raises(InputError, match="reference_eval_samples"):
        make_cfg(tmp_path, tiny_model_dir, reference_eval_samples=1).validate()


def test_infeasible_margin_stops_before_training(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, margins={"vowels": 50.0})
    with pytest.raises(InfeasibleMarginError, match="safety/vowels"):
        run_mocan(cfg, log=lambda *a: None)
    assert not (Path(cfg.out) / "pairs.parquet").exists() and not (Path(cfg.out) / "dual.json").exists()


def test_config_yaml_and_flags(tmp_path):
    y = tmp_path / "mocan.yaml"
    y.write_text("reward: r.py:f\nsafety: {harm: 'cost:c'}\nprompts: p.txt\nnum_samples: 8\n"
                 "train: {learning_rate: 0.001}\n")
    cfg = load_config(MoCANConfig, y, {"num_samples": 3, "train.num_train_epochs": 2})
    assert cfg.num_samples == 3 and cfg.train == {"learning_rate": 0.001, "num_train_epochs": 2}
    assert cfg.safety == {"harm": "cost:c"}
    y.write_text("num_sample: 8\n")
    with pytest.raises(InputError, match="num_sample"):
        load_config(MoCANConfig, y)


def test_config_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    assert main(["mocan", "--policy", cfg.policy, "--reward", cfg.reward, "--safety", "v=" + str(TOY) + ":reward",
                 "--prompts", cfg.prompts, "--out", cfg.out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cost model without a sign" in err
    assert main(["mocan", "--reward", cfg.reward, "--safety", f"v=safety:{TOY}:safety", "--out", cfg.out]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["mocan", "--prompts", cfg.prompts, "--reward", cfg.reward, "--safety", f"v=safety:{TOY}:safety",
                 "--margins", "other=0.1"]) == 2
    assert "unknown constraint" in capsys.readouterr().err


def test_shipped_configs_parse():
    from dualign.train.preference import PreferenceConfig

    for path in sorted((Path(__file__).parents[1] / "configs").glob("mocan-*.yaml")):
        cfg = load_config(MoCANConfig, path)
        assert cfg.safety and cfg.reward and cfg.prompts, path
        PreferenceConfig.from_dict(cfg.train)  # every training key is a real field


def test_held_out_prediction_is_the_tilt_of_the_held_out_reference_samples():
    """With λ* fixed, π_λ*'s weights on a prompt's samples are softmax((r + λ g) / β): the
    predicted gains are the weighted means minus the plain ones, averaged over prompts."""
    import math

    from dual_records import dual_record

    from dualign.data.scores import ScoreArrays
    from dualign.pipelines.dual_stage import held_out_prediction

    reward = np.array([[0.0, 0.1], [1.0, 0.0], [0.0, 0.0]])
    harm = np.array([[-1.0, 0.0], [0.0, -2.0], [-0.5, -0.5]])
    beta, lam = 0.5, 2.0
    d = dual_record("unsigned", beta=beta, lam=(lam,), constraints=[{"name": "safety/harm", "kind": "margin"}])
    h = held_out_prediction(d, ScoreArrays(reward, harm[:, :, None], ["safety/harm"], np.arange(3)), n_boot=50)
    z = (reward + lam * harm) / beta
    w = np.exp(z - z.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    assert h.reward_gain == pytest.approx(((w * reward).sum(1) - reward.mean(1)).mean(), abs=1e-12)
    assert h.safety_gain["safety/harm"] == pytest.approx(((w * harm).sum(1) - harm.mean(1)).mean(), abs=1e-12)
    assert h.kl == pytest.approx((w * np.log(2 * np.clip(w, 1e-300, None))).sum(1).mean(), abs=1e-9)
    assert h.kl_ceiling == pytest.approx(math.log(2)) and h.n_prompts == 3 and h.n_samples_per_prompt == 2
    # with K = 2 the jackknife doubles the gains and the KL (each leave-one-out tilt is one sample)
    assert h.bias_corrected["reward_gain"] == pytest.approx(2 * h.reward_gain, abs=1e-12)
    assert h.bias_corrected["safety_gain"]["safety/harm"] == pytest.approx(2 * h.safety_gain["safety/harm"], abs=1e-12)
    assert h.bias_corrected["kl"] == pytest.approx(2 * h.kl, abs=1e-9) and h.bias_corrected["k"] == 2
    lo, hi = h.safety_gain_ci["safety/harm"]
    assert lo <= h.safety_gain["safety/harm"] <= hi
    # a rate constraint's λ* weighs −1{unsafe}, not the score
    d_rate = dual_record("unsigned", beta=beta, lam=(lam,),
                         constraints=[{"name": "safety/harm", "kind": "max_unsafe_rate"}])
    h = held_out_prediction(d_rate, ScoreArrays(reward, harm[:, :, None], ["safety/harm"], np.arange(3)), n_boot=5)
    g = -(harm < 0).astype(float)
    z = (reward + lam * g) / beta
    w = np.exp(z - z.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    assert h.safety_gain["safety/harm"] == pytest.approx(((w * g).sum(1) - g.mean(1)).mean(), abs=1e-12)
    with pytest.raises(ValueError, match="safety columns"):
        held_out_prediction(d, ScoreArrays(reward, harm[:, :, None], ["safety/other"], np.arange(3)))


def test_report_explains_the_direction_of_a_gap():
    from dualign.eval.report import _gap_note

    scores = {"reward": {"achieved_gain": 0.1, "achieved_gain_ci": [0.0, 0.2], "predicted_gain": 1.0,
                         "prediction_within_achieved_ci": False},
              "safety/harm": {"achieved_gain": 3.0, "achieved_gain_ci": [2.5, 3.5], "predicted_gain": 1.0,
                              "prediction_within_achieved_ci": False},
              "safety/ok": {"achieved_gain": 1.0, "achieved_gain_ci": [0.5, 1.5], "predicted_gain": 1.0,
                            "prediction_within_achieved_ci": True}}
    notes = _gap_note(scores, kl=1.3)
    assert len(notes) == 2
    assert "stopped short" in notes[0] and "**reward**" in notes[0]
    assert "went beyond" in notes[1] and "predicted KL 1.3 nats" in notes[1]
    assert "predicted KL 1.3 nats, achieved 4.2" in _gap_note(scores, kl=1.3, achieved_kl=4.2)[1]
    # the prediction for the measured prompts, where there is one, is the one checked
    held = {**scores["reward"], "predicted_gain_held_out": 0.15, "held_out_prediction_within_achieved_ci": True}
    assert _gap_note({"reward": held}) == []
    held.update(predicted_gain_held_out=0.5, held_out_prediction_within_achieved_ci=False)
    assert "predicted +0.500 on these prompts" in _gap_note({"reward": held})[0]
    # a model that learned to refuse what π_ref never refused is off the samples' support
    beh = {"suites": {"harmful": {"kind": "harmful", "models": {"reference": {"rate": 0.0},
                                                                  "trained": {"rate": 0.65}}}}}
    note = _gap_note({"reward": held}, behaviour=beh)[0]
    assert "π_ref refused 0% of the harmful prompts and the trained model 65%" in note
    assert "stopped short" not in note
    beh["suites"]["harmful"]["models"]["reference"]["rate"] = 0.3  # π_ref refuses too: the usual reasons
    assert "stopped short" in _gap_note({"reward": held}, behaviour=beh)[0]


def test_predicted_kl_is_capped_by_log_k_and_the_report_says_so():
    """No reweighting of K samples is further than log K nats from uniform: with one sample
    per prompt far ahead, π_λ puts all its mass there and the predicted KL is log K."""
    import math

    import numpy as np

    from dualign.dual import solve_dual
    from dualign.eval.report import sample_ceiling_note

    rng = np.random.default_rng(0)
    n, k = 20, 4
    reward = rng.normal(size=(n, k))
    reward[:, 0] += 50.0  # sample 0 dominates every prompt at β = 0.1
    safety = rng.normal(size=(n, k, 1))
    res = solve_dual(reward, safety, beta=0.1, margins=[-10.0])
    assert res.lam[0] == 0 and res.predicted.kl == pytest.approx(math.log(k), abs=1e-9)

    from dual_records import dual_record

    def dual(kl, k):
        return dual_record(n_samples_per_prompt=k, predicted={"kl": kl})

    assert sample_ceiling_note(dual(0.5 * math.log(4) - 1e-6, 4)) is None
    note = sample_ceiling_note(dual(1.2, 4))
    assert "87% of its ceiling log K = 1.39" in note and "K = 4" in note
    assert sample_ceiling_note(dual(5.0, 1)) is None  # one sample: nothing to reweight

    # at the ceiling the KL is printed as a lower bound, below it as a prediction with its CI
    from dualign.eval.report import kl_prediction_text

    def dual_ci(kl, k):
        return dual_record(n_samples_per_prompt=k, predicted={"kl": kl, "kl_ci": (kl - 0.1, kl + 0.1)})

    assert kl_prediction_text(dual_ci(1.2, 4)) == "not predicted (≥ 1.2 nats: at 87% of log K, K = 4)"
    assert kl_prediction_text(dual_ci(0.5, 4)) == "0.500 [0.400, 0.600]"


@pytest.mark.parametrize("train, expected", [
    ("{learning_rat: 0.0001}", "field 'train.learning_rat': unknown training setting (did you mean 'learning_rate'?)"),
    ("[1, 2]", "field 'train': expected a mapping of training settings, got list"),
    ("{num_train_epochs: three}", "field 'train.num_train_epochs': expected a number, got 'three'"),
])
def test_training_settings_fail_before_any_model_loads(tmp_path, capsys, train, expected):
    # the policy does not exist and the prompts file is empty: a training-key error must come
    # first, before anything is loaded, sampled or written
    (tmp_path / "prompts.txt").write_text("How do I boil an egg?\nWhat is rain?\n")
    y = tmp_path / "mocan.yaml"
    y.write_text(f"policy: {tmp_path / 'no-such-model'}\nreward: '{TOY}:reward'\n"
                 f"safety: {{harm: 'safety:{TOY}:safety'}}\n"
                 f"prompts: {tmp_path / 'prompts.txt'}\nout: {tmp_path / 'run'}\ntrain: {train}\n")
    assert main(["mocan", "--config", str(y)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{y}: {expected}" in err  # the file, the field, the fix
    assert not (tmp_path / "run").exists()


def test_pecan_pre_align_settings_fail_before_any_model_loads(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("How do I boil an egg?\nWhat is rain?\n")
    y = tmp_path / "pecan.yaml"
    y.write_text(f"policy: {tmp_path / 'no-such-model'}\npreferences: {tmp_path / 'prefs.jsonl'}\n"
                 f"prompts: {tmp_path / 'prompts.txt'}\n"
                 f"out: {tmp_path / 'run'}\npre_align: {{num_train_epoch: 1}}\n")
    assert main(["pecan", "--config", str(y)]) == 2
    err = capsys.readouterr().err.strip()
    assert "field 'pre_align.num_train_epoch': unknown training setting (did you mean 'num_train_epochs'?)" in err
    assert not (tmp_path / "run").exists()
