"""`dualign dual` and the dual-only demo, through main() as a user runs them."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dualign import solve_dual
from dualign.cli import main
from dualign.data.scores import synthetic_scores


@pytest.fixture
def scores_file(tmp_path):
    df = synthetic_scores(n_prompts=60, k=8, seed=1)
    df["safety/harm"] = df["safety"]
    df["safety/privacy"] = df["safety"] * 0.5 + 0.1 * df["reward"]
    path = tmp_path / "scores.parquet"
    df.to_parquet(path)
    return path, df


def test_dual_writes_json_figures_and_matches_library(scores_file, tmp_path, capsys):
    path, df = scores_file
    out = tmp_path / "run" / "dual.json"
    rc = main(["dual", str(path), "--beta", "0.1", "--margin", "0.05", "--safety", "safety",
               "--bootstrap", "50", "--out", str(out), "--plot", str(tmp_path / "figs")])
    assert rc == 0
    d = json.loads(out.read_text())
    r = df["reward"].to_numpy().reshape(60, 8)
    g = df["safety"].to_numpy().reshape(60, 8)
    np.testing.assert_allclose(d["lambda"], solve_dual(r, g, 0.1, 0.05).lam, rtol=1e-10)
    assert d["feasible"] and d["converged"] and d["constraints"][0]["name"] == "safety"
    assert len(d["constraints"][0]["lambda_ci"]) == 2
    for name in ("safety_histogram", "dual_function", "solver_convergence"):
        assert (tmp_path / "figs" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "λ*" in text and "KKT residual" in text


def test_dual_reads_safety_prefixed_columns_by_default(scores_file, tmp_path):
    path, df = scores_file
    out = tmp_path / "dual.json"
    csv = tmp_path / "scores.csv"
    df.drop(columns=["safety"]).to_csv(csv, index=False)
    assert main(["dual", str(csv), "--margin", "0.02", "--margin", "0.01", "--bootstrap", "10",
                 "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [c["name"] for c in d["constraints"]] == ["safety/harm", "safety/privacy"]


def test_infeasible_margin_is_one_line_exit_2(scores_file, tmp_path, capsys):
    path, _ = scores_file
    out = tmp_path / "dual.json"
    rc = main(["dual", str(path), "--safety", "safety", "--margin", "100", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "margin 100 cannot be reached" in err and "largest achievable gain" in err
    assert not out.exists()


@pytest.mark.parametrize("mutate,expect", [
    (lambda df: df.drop(columns=["reward"]), "field 'reward'"),
    (lambda df: df.assign(reward=df["reward"].where(df.index != 7, np.nan)), "record 8, field 'reward'"),
    (lambda df: df.iloc[:-1], "samples but most prompts have"),
    (lambda df: df.drop(columns=["safety", "safety/harm", "safety/privacy"]), "no safety column"),
])
def test_bad_tables_name_file_record_field(scores_file, tmp_path, capsys, mutate, expect):
    _, df = scores_file
    bad = tmp_path / "bad.csv"
    mutate(df).to_csv(bad, index=False)
    rc = main(["dual", str(bad), "--margin", "0.01", "--bootstrap", "5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(bad) in err and expect in err


def test_bad_jsonl_line_is_named(tmp_path, capsys):
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"prompt_id": 0, "reward": 1, "safety": 0}\n{not json\n')
    assert main(["dual", str(bad)]) == 2
    assert "record line 2" in capsys.readouterr().err


def test_missing_file_and_margin_count(scores_file, capsys):
    path, _ = scores_file
    assert main(["dual", "/nonexistent/scores.parquet"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["dual", str(path), "--margin", "0.1", "--margin", "0.2", "--margin", "0.3",
                 "--safety", "safety/harm", "--safety", "safety/privacy"]) == 2
    assert "--margin" in capsys.readouterr().err


def test_dual_only_demo_runs_on_bundled_scores(tmp_path, capsys):
    assert main(["demo", "--dual-only", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and str(tmp_path / "demo") in out
    d = json.loads((tmp_path / "demo" / "dual.json").read_text())
    assert d["converged"] and d["lambda"][0] > 0


def test_bundled_scores_are_what_the_generator_documents():
    from pathlib import Path

    import dualign
    bundled = pd.read_csv(Path(dualign.__file__).parent / "data" / "demo" / "synthetic_scores.csv")
    pd.testing.assert_frame_equal(bundled, synthetic_scores(), check_dtype=False)
