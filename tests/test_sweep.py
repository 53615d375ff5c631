"""`dualign sweep`: shared stages computed once, one complete MoCAN run per point, the table
and figure, resume after a kill, λ points that the dual gives back, and the documented errors."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dualign import InputError
from dualign.data.scores import scores_to_arrays
from dualign.cli import main
from dualign.dual import solve_dual
from dualign.pipelines import stages as S
from dualign.pipelines.sweep import parse_points, point_configs, run_sweep, summarize
from test_mocan_pipeline import make_cfg

QUIET = dict(log=lambda *a: None)


def test_sweep_shares_stages_resumes_after_a_kill_and_writes_the_table(tmp_path, tiny_model_dir, monkeypatch):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    real_train, calls = S.train_stage, {"n": 0}

    def killed_in_second_point(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed while training the second point")
        return real_train(*a, **k)

    monkeypatch.setattr(S, "train_stage", killed_in_second_point)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, "fraction", [0.3, 0.8], **QUIET)
    root = tmp_path / "run"
    first = root / "points" / "fraction-0.3"
    assert (first / "eval.json").exists() and not (root / "sweep.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (root / "samples.parquet", root / "scores.parquet",
                                                first / "train" / "train_result.json",
                                                first / "eval" / "trained" / "samples.parquet")}

    monkeypatch.setattr(S, "train_stage", real_train)
    run_sweep(cfg, "fraction", [0.3, 0.8], **QUIET)
    # the finished point's training and samples and the shared stages were not recomputed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    second = root / "points" / "fraction-0.8"
    for shared in ("samples.parquet", "scores.parquet"):  # copies with the sweep's timestamps: not resampled
        assert (second / shared).stat().st_mtime_ns == (root / shared).stat().st_mtime_ns
    ref_eval = "eval/reference/samples.parquet"  # π_ref's evaluation: made by the first point, reused
    assert (second / ref_eval).stat().st_mtime_ns == (first / ref_eval).stat().st_mtime_ns

    summary = json.loads((root / "sweep.json").read_text())
    assert [p["point"] for p in summary["points"]] == ["fraction-0.3", "fraction-0.8"]
    duals = [json.loads((d / "dual.json").read_text()) for d in (first, second)]
    for row, dual, d in zip(summary["points"], duals, (first, second)):
        ev = json.loads((d / "eval.json").read_text())
        assert row["lambda"] == dual["lambda"] and row["margins"] == dual["margins"]
        s = row["scores"]["safety/vowels"]
        assert s["predicted"] == ev["scores"]["safety/vowels"]["predicted_gain"]
        here = ev["scores"]["safety/vowels"]["predicted_gain_held_out"]  # the same prompts as the measurement
        assert s["predicted_held_out"] == here
        assert s["holds"] == (s["achieved_ci"][0] <= here <= s["achieved_ci"][1])
        assert row["kl"]["achieved"] == ev["kl"]["achieved"]
        assert row["learned_tilt"] == ev["learned_tilt"]  # each point's own model against its own λ*
        assert row["learned_tilt_training_samples"] == ev["learned_tilt_training_samples"]
        k = row["kl"]
        bound = dual["predicted"]["kl"] >= 0.5 * np.log(dual["n_samples_per_prompt"])
        assert k["predicted_is_lower_bound"] == ev["kl"]["predicted_is_lower_bound"] == bound
        # a lower bound is not checked; a prediction holds inside the CI or within ±35%
        assert k["holds"] == (None if bound else (k["achieved_ci"][0] <= k["predicted"] <= k["achieved_ci"][1]
                                                  or abs(k["achieved"] - k["predicted"]) <= 0.35 * k["predicted"]))
    assert duals[1]["margins"][0] > duals[0]["margins"][0] and duals[1]["lambda"][0] > duals[0]["lambda"][0]
    table = (root / "sweep.md").read_text()
    assert "fraction-0.3" in table and "KL, nats" in table and "safety/vowels gain" in table
    assert table.count("tilt learned (slope)") == 2
    assert (root / "figures" / "frontier.png").stat().st_size > 1000

    # the held-out prediction checked is the jackknifed one only where the correction moved it by
    # at most half: with 2 samples per prompt the jackknife doubles it, and the K-sample value is checked
    ev_path = first / "eval.json"
    ev = json.loads(ev_path.read_text())
    entry = ev["scores"]["safety/vowels"]
    lo, hi = entry["achieved_gain_ci"]
    here = entry["predicted_gain_held_out"] = (lo + hi) / 2  # inside the CI
    for corrected, checked in ((2 * here, here), (1.2 * here, 1.2 * here)):
        entry["predicted_gain_held_out_corrected"] = corrected
        ev_path.write_text(json.dumps(ev))
        s = summarize(root, [("fraction-0.3", first)], "fraction")["points"][0]["scores"]["safety/vowels"]
        assert s["checked"] == pytest.approx(checked, rel=1e-12)
        assert s["holds"] == (lo <= checked <= hi)


def test_lambda_points_are_given_back_by_the_dual(tmp_path):
    rng = np.random.default_rng(0)
    n, k = 40, 8
    scores = pd.DataFrame({"prompt_id": np.repeat(np.arange(n), k), "sample_id": np.tile(np.arange(k), n),
                           "reward": rng.normal(size=n * k), "safety/harm": rng.normal(size=n * k)})
    scores["reward"] -= 0.8 * scores["safety/harm"]  # safer answers earn less reward: the constraint binds
    cfg = make_cfg(tmp_path, "unused", safety={"harm": "harm:unused"})
    points = point_configs(cfg, "lambda", [0.5, 2.0], scores_to_arrays(scores))
    assert [name for name, _ in points] == ["lambda-0.5", "lambda-2"]
    r = scores["reward"].to_numpy().reshape(n, k)
    g = scores["safety/harm"].to_numpy().reshape(n, k)
    for lam, (_, pcfg) in zip((0.5, 2.0), points):
        assert pcfg.out.endswith(f"points/lambda-{lam:g}")
        res = solve_dual(r, g, cfg.beta, [pcfg.margins["harm"]])
        assert res.lam[0] == pytest.approx(lam, abs=1e-3)


@pytest.mark.parametrize("text, kind, message", [
    ("0.2,abc", "fraction", "comma-separated numbers"), ("", "fraction", "no values"),
    ("0.5,0.5", "fraction", "repeated"), ("0.5,1.2", "fraction", "lie in \\(0, 1\\)"),
    ("-1", "lambda", ">= 0"), ("1,nan", "margin", "finite")])
def test_bad_points_raise_one_line_errors(text, kind, message):
    with pytest.raises(InputError, match=message):
        parse_points(text, kind)


def test_sweep_settings_errors_come_before_any_work(tmp_path, tiny_model_dir, capsys):
    cfg = make_cfg(tmp_path, tiny_model_dir, margins={"vowels": 0.1})
    with pytest.raises(InputError, match="margins"):
        run_sweep(cfg, "fraction", [0.5], **QUIET)
    two = make_cfg(tmp_path, tiny_model_dir, safety={"a": cfg.safety["vowels"], "b": cfg.safety["vowels"]})
    with pytest.raises(InputError, match="one safety constraint"):
        run_sweep(two, "margin", [0.1], **QUIET)
    assert not (tmp_path / "run" / "samples.parquet").exists()  # nothing was sampled
    # the CLI: one line, exit code 2
    assert main(["sweep", "--demo", "--margins", "0.5", "--lambdas", "1"]) == 2
    assert main(["sweep", "--margins", "0.5"]) == 2
    assert main(["sweep", "--demo", "--margins", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("dualign: error") or "error" in line for line in err)
