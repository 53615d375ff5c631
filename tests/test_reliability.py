"""Regression tests for the reliability failures of issue 15 (items 1-6 and 13) in the dual, the
score-table and preference loaders and run-directory I/O: every bad input gets a one-line
error and exit code 2 (never a traceback), and nothing half-written is left behind."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dualign import InfeasibleMarginError, bootstrap_dual, solve_dual
from dualign.cli import main
from dualign.data.preferences import load_preferences
from dualign.data.scores import read_score_arrays, synthetic_scores
from dualign.dual import DualProblem
from dualign.errors import DualignError, DualNotConvergedError, InputError, OutputError
from dualign.runio import atomic_path, check_output_file, write_json, write_parquet, write_text

S = Path(__file__).resolve().parents[1] / "dualign" / "data" / "demo" / "synthetic_scores.csv"


def one_line_exit_2(capsys, argv) -> str:
    """Run the CLI; assert exit code 2 and a one-line error without a traceback; return it."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def small_scores(tmp_path):
    df = synthetic_scores(n_prompts=12, k=4, seed=3)
    path = tmp_path / "scores.csv"
    df.to_csv(path, index=False)
    return path, df


# ----------------------------------------------------------------------------- 1. library errors


@pytest.mark.parametrize("flags,field", [
    (["--beta", "0"], "beta"), (["--beta", "-0.1"], "beta"), (["--beta", "inf"], "beta"),
    (["--beta", "nan"], "beta"), (["--margin", "nan"], "margins"), (["--bootstrap", "0"], "n_boot"),
    (["--level", "1.5"], "level"), (["--seed", "-1"], "seed"),
])
def test_dual_bad_numbers_are_one_line_exit_2(small_scores, tmp_path, capsys, flags, field):
    path, _ = small_scores
    out = tmp_path / "dual.json"
    err = one_line_exit_2(capsys, ["dual", str(path), "--bootstrap", "5", *flags, "--out", str(out)])
    assert f"field '{field}'" in err
    assert not out.exists()


@pytest.mark.parametrize("kw,field", [
    (dict(beta=0.0), "beta"), (dict(beta=float("nan")), "beta"), (dict(margins=float("inf")), "margins"),
    (dict(n_boot=0), "n_boot"), (dict(level=1.5), "level"), (dict(seed=-1), "seed"),
])
def test_library_raises_input_error_naming_the_field(kw, field):
    r, g = np.random.default_rng(0).normal(size=(2, 20, 4))
    args = dict(beta=0.1, margins=0.0, n_boot=3) | kw
    with pytest.raises(InputError) as ei:
        bootstrap_dual(r, g, **args)
    assert ei.value.field == field and isinstance(ei.value, ValueError)
    if "n_boot" not in kw and "level" not in kw and "seed" not in kw:
        with pytest.raises(InputError, match=field):
            solve_dual(r, g, args["beta"], args["margins"])


def test_one_sample_per_prompt_names_the_file(tmp_path, capsys):
    bad = tmp_path / "k1.csv"
    synthetic_scores(n_prompts=5, k=1).to_csv(bad, index=False)
    err = one_line_exit_2(capsys, ["dual", str(bad)])
    assert str(bad) in err and "K >= 2" in err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model: bad settings must be caught before."""
    import dualign.models.loading as loading
    # modules that bind `load_policy` by name at import: imported now, so that they keep the
    # real function once the patch is undone (else a later test would load nothing)
    import dualign.pipelines.compare  # noqa: F401
    import dualign.pipelines.mocan  # noqa: F401
    import dualign.pipelines.pecan  # noqa: F401

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(loading, "load_policy", refuse)


@pytest.mark.parametrize("flags,field", [
    (["--max-new-tokens", "0"], "max_new_tokens"), (["--temperature", "-1"], "temperature"),
    (["--top-p", "2"], "top_p"), (["-k", "0"], "num_samples"), (["--batch-size", "0"], "batch_size"),
    (["--seed", "-3"], "seed"), (["--limit", "0"], "limit"), (["--device", "cuda"], "device"),
    (["--device", "nonsense"], "device"),
])
def test_sample_bad_settings_caught_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model_load,
                                                           flags, field):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nworld\n")
    run = tmp_path / "run"
    err = one_line_exit_2(capsys, ["sample", "--model", "/nonexistent/model", "--prompts", str(prompts),
                                   "--out", str(run), *flags])
    assert f"field '{field}'" in err
    assert not (run / "samples.partial").exists() and not (run / "samples.partial" / "settings.json").exists()


def test_sample_library_checks_settings_before_writing(tmp_path):
    from dualign.models.generation import sample

    with pytest.raises(InputError, match="num_samples"):
        sample(None, None, ["hi"], num_samples=0, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,field", [
    (["--name", ""], "--name"), (["--name", "a/b"], "--name"), (["--name", "ref", "--batch-size", "0"], "--batch-size"),
    (["--name", "ref", "--device", "cuda:0"], "device"),
])
def test_logprobs_bad_settings_caught_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model_load,
                                                             flags, field):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = one_line_exit_2(capsys, ["logprobs", "--model", "/nonexistent/model", "--samples",
                                   str(tmp_path / "samples.parquet"), *flags])
    assert f"field '{field}'" in err


# ----------------------------------------------------------------------------- 2. output paths


def test_output_path_errors_are_one_line(small_scores, tmp_path, capsys):
    path, _ = small_scores
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = ["dual", str(path), "--bootstrap", "5"]
    assert "refusing to replace a directory" in one_line_exit_2(capsys, base + ["--out", str(tmp_path)])
    assert "is a file" in one_line_exit_2(capsys, base + ["--out", str(a_file / "dual.json")])
    assert "not a directory" in one_line_exit_2(capsys, base + ["--plot", str(a_file / "figs")])


def test_plot_at_an_existing_file_writes_no_dual_json(small_scores, tmp_path, capsys):
    path, _ = small_scores
    (tmp_path / "figs").write_text("a file, not a folder")
    out = tmp_path / "dual.json"
    err = one_line_exit_2(capsys, ["dual", str(path), "--bootstrap", "5", "--out", str(out),
                                   "--plot", str(tmp_path / "figs")])
    assert "figs" in err and not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_directory(small_scores, tmp_path, capsys):
    path, _ = small_scores
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = one_line_exit_2(capsys, ["dual", str(path), "--out", str(ro / "dual.json")])
        assert "not writable" in err
    finally:
        ro.chmod(0o755)


def test_unwritable_directory_is_checked_up_front(tmp_path, monkeypatch):
    # os.access is what the check asks; as root every directory is writable, so ask it to say no
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False)
    with pytest.raises(OutputError, match="not writable"):
        check_output_file(tmp_path / "dual.json")


def test_a_failing_write_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(OutputError) as ei:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert str(target) in str(ei.value) and "No space left" in str(ei.value)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


# ----------------------------------------------------------------------------- 3. atomic writes


def test_atomic_write_refuses_non_regular_targets(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    for target, kind in ((link, "symlink"), (fifo, "FIFO"), (folder, "directory")):
        with pytest.raises(OutputError, match=kind) as ei:
            write_json({"a": 1}, target)
        assert str(target) in str(ei.value)
    assert link.is_symlink() and real.read_text() == "keep"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir()


def test_atomic_write_refuses_a_device_node(tmp_path):
    dev = tmp_path / "null"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    with pytest.raises(OutputError, match="character device"):
        write_text("x", dev)
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_respects_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json({"a": 1}, tmp_path / "new.json")
        write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "t.parquet")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "t.parquet").st_mode) == mode


# ----------------------------------------------------------------------------- 4. the dual converges or raises


def _demo_arrays():
    a = read_score_arrays(S)
    return a.reward, a.safety


def test_huge_scores_are_solved_in_rescaled_units():
    r, g = _demo_arrays()
    base = solve_dual(r, g, 0.1, 0.1)
    c = 1e200  # r, g, b and β scaled together: λ* is the same (the dual is homogeneous)
    big = solve_dual(r * c, g * c, 0.1 * c, 0.1 * c)
    assert big.converged and big.options["score_unit"] != 1.0
    np.testing.assert_allclose(big.lam, base.lam, rtol=1e-9)
    np.testing.assert_allclose(big.predicted.safety_gain / c, base.predicted.safety_gain, rtol=1e-9)
    assert big.predicted.kl == pytest.approx(base.predicted.kl, rel=1e-9)
    tiny = solve_dual(r * 1e-200, g * 1e-200, 0.1e-200, 0.1e-200)
    np.testing.assert_allclose(tiny.lam, base.lam, rtol=1e-9)
    bs = bootstrap_dual(r * c, g * c, 0.1 * c, 0.1 * c, n_boot=20)
    assert np.all(np.isfinite(bs.ci["lambda"])) and np.all(np.isfinite(bs.ci["kl"]))
    # ordinary magnitudes are solved as given, bit for bit
    assert "score_unit" not in base.options


@pytest.mark.parametrize("scale,beta", [(1e200, 0.1), (1.0, 1e-300)])
def test_a_dual_that_cannot_converge_raises(scale, beta):
    r, g = _demo_arrays()
    with pytest.raises(DualNotConvergedError, match="did not converge.*use a larger β") as ei:
        solve_dual(r * scale, g * scale, beta, 0.1)
    assert isinstance(ei.value, DualignError) and ei.value.kkt_residual > 1e-10


def test_cli_never_records_a_non_converged_dual(tmp_path, capsys):
    out = tmp_path / "dual.json"
    err = one_line_exit_2(capsys, ["dual", str(S), "--beta", "1e-300", "--bootstrap", "5", "--out", str(out)])
    assert "did not converge" in err and not out.exists()


def _competing_constraints(n=200, k=24, m=8, seed=2):
    """m constraints that compete within every sample (a sample good on one is worse on the
    others: each score minus half the mean of the others), varying on every 10th prompt only,
    at score scale 50: each margin alone is reachable, all eight at 57% of their largest gains
    are not. With this seed Newton wanders off (λ up to 1e7) without a recession certificate,
    the case that slipped through as `converged=False`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k, m))
    z = z - 0.5 * (z.sum(-1, keepdims=True) - z) / (m - 1)
    z *= (np.arange(n) % 10 == 0)[:, None, None]
    return 50 * rng.normal(size=(n, k)), 50 * z


def test_jointly_infeasible_eight_margins_raise():
    r, g = _competing_constraints()
    margins = 0.57 * DualProblem(r, g, 0.89).max_gain()
    assert DualProblem(r, g, 0.89, margins).max_joint_slack() < 0  # the LP: no reweighting meets all eight
    with pytest.raises(InfeasibleMarginError, match="together"):
        solve_dual(r, g, 0.89, margins)


def test_feasible_three_margins_still_solve():
    r, g = _competing_constraints(m=3)
    margins = 0.2 * DualProblem(r, g, 0.89).max_gain()  # 0.25 is near the joint edge, 0.3 beyond it
    assert DualProblem(r, g, 0.89, margins).max_joint_slack() > 0
    res = solve_dual(r, g, 0.89, margins)
    assert res.converged and np.all(res.lam > 0)
    assert np.all(res.predicted.safety_gain >= margins - 1e-8 * np.abs(margins))


def test_the_lp_decides_when_newton_stops_short(monkeypatch):
    """The two outcomes of a solve that stops short: the LP over the samples tells them apart
    (with the recession-slope shortcut switched off, so that the LP is what decides)."""
    monkeypatch.setattr(DualProblem, "recession_slope", lambda self, d: 1.0)
    n, k = 30, 2
    g = np.zeros((n, k, 2))
    g[:, 0, 0] = g[:, 1, 1] = 1  # E[g1] + E[g2] = 1 under every policy
    r = np.random.default_rng(0).normal(size=(n, k))
    with pytest.raises(InfeasibleMarginError, match="linear program"):
        solve_dual(r, g, 0.1, [0.2, 0.2], max_iter=1)  # needs E[g1] + E[g2] >= 1.4
    with pytest.raises(DualNotConvergedError, match="reachable"):
        solve_dual(r, g, 0.1, [0.2, -0.3], max_iter=1)  # reachable, but one step is not enough
    assert solve_dual(r, g, 0.1, [0.2, -0.3]).converged


def test_bootstrap_leaves_out_and_counts_non_converged_replicates(monkeypatch):
    import dualign.dual.bootstrap as bootstrap

    real = bootstrap.solve_problem

    def flaky(problem, **kw):
        if kw.get("lam0") is not None and problem.R[0, 0] > 0:  # some replicates stop short
            raise DualNotConvergedError("stopped short", lam=np.zeros(1), kkt_residual=1.0, iterations=100)
        return real(problem, **kw)

    monkeypatch.setattr(bootstrap, "solve_problem", flaky)
    r, g = _demo_arrays()
    bs = bootstrap.bootstrap_dual(r, g, 0.1, 0.1, n_boot=30, method="full")  # one-step: tests/test_bootstrap.py
    assert 0 < bs.n_not_converged < 30 and len(bs.replicates["lambda"]) == 30 - bs.n_not_converged
    assert bs.to_dict()["n_not_converged"] == bs.n_not_converged


# ----------------------------------------------------------------------------- 5, 6. score tables


def test_duplicate_rows_name_file_record_and_fields(small_scores, tmp_path, capsys):
    _, df = small_scores
    bad = tmp_path / "twice.csv"
    pd.concat([df, df]).to_csv(bad, index=False)
    err = one_line_exit_2(capsys, ["dual", str(bad), "--bootstrap", "5"])
    assert str(bad) in err and f"record {len(df) + 1}" in err and "repeats record 1" in err
    assert "prompt_id" in err and "sample_id" in err


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_missing_like_prompt_ids_are_ids(tmp_path, suffix):
    ids = ["NA", "null", "NaN", "None", "n/a"]
    df = pd.DataFrame({"prompt_id": np.repeat(ids, 3), "sample_id": np.tile(range(3), 5),
                       "reward": np.arange(15.0), "safety": np.arange(15.0)[::-1]})
    path = tmp_path / f"s{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_json(path, orient="records", lines=True)
    a = read_score_arrays(path)
    assert sorted(a.prompt_ids) == sorted(ids) and a.reward.shape == (5, 3)


def test_csv_ids_keep_their_order_and_007_is_not_7(tmp_path):
    df = synthetic_scores(n_prompts=12, k=2)
    path = tmp_path / "s.csv"
    df.to_csv(path, index=False)
    assert list(read_score_arrays(path).prompt_ids) == list(range(12))  # numeric ids: numeric order, as before
    path.write_text("prompt_id,sample_id,reward,safety\n7,0,1,1\n7,1,2,0\n007,0,1,1\n007,1,0,2\n")
    assert sorted(read_score_arrays(path).prompt_ids) == ["007", "7"]


@pytest.mark.parametrize("text,expect", [
    ("prompt_id,sample_id,reward,safety\na,0,1,1\n,1,2,0\n", "record 2, field 'prompt_id'"),
    ("prompt_id,sample_id,reward,safety\na,0,1,1\na,,2,0\n", "record 2, field 'sample_id'"),
    ('{"prompt_id": "a", "reward": 1, "safety": 0}\n{"prompt_id": null, "reward": 1, "safety": 0}\n',
     "record 2, field 'prompt_id'"),
    ('{"prompt_id": "a", "reward": 1, "safety": 0}\n{"prompt_id": 3, "reward": 1, "safety": 0}\n', "mix"),
    ('{"prompt_id": [1], "reward": 1, "safety": 0}\n', "record 1, field 'prompt_id'"),
    ('{"prompt_id": 1, "reward": [1], "safety": 0}\n', "record 1, field 'reward'"),
])
def test_bad_ids_name_the_record(tmp_path, text, expect):
    path = tmp_path / ("s.csv" if text.startswith("prompt_id") else "s.jsonl")
    path.write_text(text)
    with pytest.raises(InputError) as ei:
        read_score_arrays(path)
    assert str(path) in str(ei.value) and expect in str(ei.value)


# ----------------------------------------------------------------------------- 13. smaller


def test_margin_0_with_constant_safety_is_reachable(tmp_path, capsys):
    df = synthetic_scores(n_prompts=10, k=4).assign(safety=1.0)
    path = tmp_path / "flat.csv"
    df.to_csv(path, index=False)
    out = tmp_path / "dual.json"
    assert main(["dual", str(path), "--margin", "0", "--bootstrap", "5", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["lambda"] == [0.0]


def test_preference_file_with_no_known_columns_is_named(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(InputError, match="unknown preference schema") as ei:
        load_preferences(path)
    assert str(path) in str(ei.value)


def test_record_numbers_count_from_1_in_both_loaders(tmp_path):
    scores = tmp_path / "s.csv"
    scores.write_text("prompt_id,sample_id,reward,safety\n0,0,x,1\n0,1,2,0\n")
    with pytest.raises(InputError, match="record 1, field 'reward'"):
        read_score_arrays(scores)
    prefs = tmp_path / "p.jsonl"
    prefs.write_text('{"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 2}\n')
    with pytest.raises(InputError, match="record 1, field 'better_response_id'"):
        load_preferences(prefs)


def test_preference_loader_rejects_a_bad_limit_and_huge_ids(tmp_path):
    prefs = tmp_path / "p.jsonl"
    huge = "1" + "0" * 400  # an integer no float holds
    prefs.write_text('{"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": ' + huge + "}\n")
    with pytest.raises(InputError, match="better_response_id"):
        load_preferences(prefs)
    with pytest.raises(InputError, match="limit"):
        load_preferences(prefs, limit=0)


# ----------------------------------------------------------------------------- fuzz: loaders never crash

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
COLUMNS = ["prompt_id", "sample_id", "reward", "safety", "safety/harm", "prompt", "response_0", "response_1",
           "better_response_id", "safer_response_id", "is_response_0_safe", "is_response_1_safe", "chosen",
           "rejected", "category", "other"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2, max_value=2),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "NA", "null", "NaN", " ", "0", "1", "true"]),
    st.text(max_size=12), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["role", "content"]), st.text(max_size=5), max_size=2),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=5)}),
             max_size=2),
)
RECORDS = st.one_of(
    st.lists(st.dictionaries(st.sampled_from(COLUMNS), VALUES, max_size=8), max_size=8),
    # tables that get past the column checks, so the values are what is tested
    st.lists(st.fixed_dictionaries({"prompt_id": VALUES, "reward": VALUES, "safety": VALUES},
                                   optional={"sample_id": VALUES}), max_size=8),
    st.lists(st.fixed_dictionaries({"prompt_id": st.sampled_from(["a", "b", "NA", ""]),
                                    "sample_id": st.integers(0, 2), "reward": st.floats(), "safety": st.floats()}),
             max_size=8),
    st.lists(st.fixed_dictionaries({c: VALUES for c in COLUMNS[5:12]}), max_size=6),
    st.lists(st.fixed_dictionaries({"prompt": VALUES, "chosen": VALUES, "rejected": VALUES}), max_size=6),
)


def _load_both(path: Path):
    """Both loaders on `path`: each returns or raises InputError, nothing else."""
    for load in (read_score_arrays, load_preferences):
        try:
            load(path)
        except InputError:
            pass


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".jsonl"]))
def test_fuzz_random_bytes(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"t{suffix}"
    path.write_bytes(data)
    _load_both(path)


@FUZZ
@given(records=RECORDS)
def test_fuzz_jsonl_records(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("fuzz") / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    _load_both(path)


@FUZZ
@given(records=RECORDS)
def test_fuzz_csv_tables(tmp_path_factory, records):
    import csv

    path = tmp_path_factory.mktemp("fuzz") / "t.csv"
    cols = sorted({c for r in records for c in r})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if cols:
            w.writerow(cols)
        for r in records:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    _load_both(path)


# ----------------------------------------------------------------------------- 8. interrupted checkpoint saves
# (items 8-12 of issue 15)

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _tiny_pairs(n=8):
    words = ["yes", "no", "maybe", "the sky is blue", "I can't help with that", "sure, here:", "ok", "never"]
    prompts = ["hi", "what is two plus two?", "tell me a story", "why?"]
    return pd.DataFrame({"prompt": [prompts[i % 4] for i in range(n)],
                         "response_0": [words[i % 8] for i in range(n)],
                         "response_1": [words[(3 * i + 1) % 8] for i in range(n)],
                         "label": np.random.default_rng(1).uniform(0, 1, n)})


def _kill_at(step):
    """A TrainerCallback that kills the run (raises) when `global_step` reaches `step`."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise KeyboardInterrupt(f"killed at step {step}")

    return Kill()


def test_an_interrupted_checkpoint_save_is_dropped_and_the_run_resumes(tiny_tokenizer, tmp_path):
    import torch
    from conftest import make_tiny_llama

    from dualign.train import PreferenceConfig, train_preferences
    from dualign.train.preference import _checkpoint_complete

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and immune to the other processes
    try:
        tok, pairs = tiny_tokenizer, _tiny_pairs()
        common = dict(max_steps=6, save_steps=2, per_device_train_batch_size=2, learning_rate=5e-3,
                      use_lora=False, seed=3, save_total_limit=None, logging_steps=1)
        full = train_preferences(make_tiny_llama(len(tok), seed=0), tok, pairs,
                                 PreferenceConfig(output_dir=str(tmp_path / "a"), **common), resume=False)
        b = tmp_path / "b"
        cfg = PreferenceConfig(output_dir=str(b), **common)
        with pytest.raises(KeyboardInterrupt):
            train_preferences(make_tiny_llama(len(tok), seed=0), tok, pairs, cfg, resume=False,
                              callbacks=[_kill_at(5)])
        assert _checkpoint_complete(b / "checkpoint-4")
        # killed while saving: step 6 before anything was written (an empty folder), step 5 while
        # writing trainer_state.json, the last file (weights there, the state cut short)
        (b / "checkpoint-6").mkdir()
        shutil.copytree(b / "checkpoint-4", b / "checkpoint-5")
        state = b / "checkpoint-5" / "trainer_state.json"
        state.write_text(state.read_text()[:40])
        assert not _checkpoint_complete(b / "checkpoint-5") and not _checkpoint_complete(b / "checkpoint-6")

        with pytest.warns(UserWarning, match="incomplete checkpoint"):
            resumed = train_preferences(make_tiny_llama(len(tok), seed=0), tok, pairs, cfg, resume=True)
        assert resumed.resumed_from.endswith("checkpoint-4")
        assert resumed.global_step == full.global_step == 6
        assert not (b / "checkpoint-5").exists() and _checkpoint_complete(b / "checkpoint-6")
        a_state, b_state = full.model.state_dict(), resumed.model.state_dict()
        for k in a_state:
            assert torch.allclose(a_state[k], b_state[k], rtol=0, atol=1e-6), k
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- 9. scoring resumes per part

COUNTING_SCORER = '''
import os
from pathlib import Path

LOG = Path(__file__).with_name("calls.log")


def length(prompts, responses):
    """Scores = response length; every call is logged (one line: the responses scored), and the
    call after DUALIGN_TEST_FAIL_AFTER logged ones raises, as a kill would."""
    done = LOG.read_text().splitlines() if LOG.exists() else []
    if len(done) >= int(os.environ.get("DUALIGN_TEST_FAIL_AFTER", "1000000")):
        raise RuntimeError("killed")
    with LOG.open("a") as f:
        f.write(",".join(responses) + "\\n")
    return [len(r) + 0.25 * len(p) for p, r in zip(prompts, responses)]
'''


def _scoring_setup(root: Path):
    """A samples table (6 prompts x 4 samples, distinct responses) and a logging scorer file."""
    from dualign.runio import write_parquet

    root.mkdir()
    n = 24
    samples = pd.DataFrame({"prompt_id": np.repeat(np.arange(6), 4), "sample_id": np.tile(np.arange(4), 6),
                            "prompt": [f"prompt {i // 4}" for i in range(n)],
                            "response": [f"r{i}" + "x" * ((7 * i) % 11) for i in range(n)]})
    write_parquet(samples, root / "samples.parquet")
    (root / "toy.py").write_text(COUNTING_SCORER)
    return root / "samples.parquet", root / "toy.py", root / "calls.log"


def _calls(log: Path) -> list[list[str]]:
    return [line.split(",") for line in log.read_text().splitlines()] if log.exists() else []


def test_a_killed_scoring_resumes_from_its_finished_parts(tmp_path, monkeypatch):
    from dualign.pipelines.scoring import partial_dir, score_jobs, score_samples

    quiet = dict(batch_size=2, part_batches=2, log=lambda *a: None)  # 4 rows a part: 6 parts, 12 calls a column
    samples, toy, log = _scoring_setup(tmp_path / "run")
    jobs = score_jobs(f"reward:{toy}:length", [f"len=safety:{toy}:length"])
    out = samples.parent / "scores.parquet"
    # killed in the safety column: the reward's 12 calls, 3 parts of safety (6 calls) and one batch
    monkeypatch.setenv("DUALIGN_TEST_FAIL_AFTER", "19")
    with pytest.raises(RuntimeError, match="killed"):
        score_samples(samples, jobs, out, **quiet)
    first = _calls(log)
    assert len(first) == 19
    stored = sorted((partial_dir(out)).glob("*/part-*.parquet"))
    assert [p.name for p in stored] == [f"part-{i:06d}.parquet" for i in range(3)]
    done_rows = set().union(*(set(pd.read_parquet(p)["row"]) for p in stored))

    monkeypatch.delenv("DUALIGN_TEST_FAIL_AFTER")
    table = score_samples(samples, jobs, out, **quiet)
    again = _calls(log)[19:]
    assert len(again) == 6  # the 3 missing parts of safety; nothing of the reward, nothing stored redone
    responses = pd.read_parquet(samples)["response"].tolist()
    rescored = {responses.index(r) for call in again for r in call}
    assert rescored.isdisjoint(done_rows) and rescored | done_rows == set(range(24))
    assert not partial_dir(out).exists()

    # an uninterrupted run writes the same file, byte for byte
    clean_samples, clean_toy, _ = _scoring_setup(tmp_path / "clean")
    clean_out = clean_samples.parent / "scores.parquet"
    score_samples(clean_samples, score_jobs(f"reward:{clean_toy}:length", [f"len=safety:{clean_toy}:length"]),
                  clean_out, **quiet)
    want = pd.read_parquet(samples)
    assert np.array_equal(table["reward"], [len(r) + 0.25 * len(p) for p, r in zip(want["prompt"], want["response"])])
    # the spec names the scorer file, so compare with the path swapped; then the bytes
    a, b = pd.read_parquet(out), pd.read_parquet(clean_out)
    pd.testing.assert_frame_equal(a, b)
    same_spec = score_jobs(f"reward:{toy}:length", [f"len=safety:{toy}:length"])
    shutil.copy(out, tmp_path / "resumed.parquet")
    out.unlink()
    log.unlink()
    score_samples(samples, same_spec, out, **quiet)  # a clean run with the resumed run's specs
    assert out.read_bytes() == (tmp_path / "resumed.parquet").read_bytes()


def test_scoring_parts_of_other_settings_are_not_reused(tmp_path, monkeypatch):
    from dualign.pipelines.scoring import partial_dir, score_jobs, score_samples

    samples, toy, log = _scoring_setup(tmp_path / "run")
    jobs = score_jobs(f"reward:{toy}:length", None)
    out = samples.parent / "scores.parquet"
    monkeypatch.setenv("DUALIGN_TEST_FAIL_AFTER", "4")
    with pytest.raises(RuntimeError):
        score_samples(samples, jobs, out, batch_size=2, part_batches=2, log=lambda *a: None)
    assert len(list(partial_dir(out).glob("*/part-*.parquet"))) == 2
    monkeypatch.delenv("DUALIGN_TEST_FAIL_AFTER")
    # another batch size: other batches, so the parts are discarded and the column scored afresh
    score_samples(samples, jobs, out, batch_size=3, part_batches=2, log=lambda *a: None)
    assert len(_calls(log)) == 4 + 8 and sum(map(len, _calls(log)[4:])) == 24


# ----------------------------------------------------------------------------- 10. one run per folder

def _hold_lock(directory: Path) -> subprocess.Popen:
    """Another process holding the run lock of `directory` until its stdin closes."""
    code = ("import sys\nfrom dualign.runio import run_lock\nwith run_lock(sys.argv[1]):\n"
            "    print('locked', flush=True)\n    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_folder_refuses_a_second_run_and_frees_on_exit_or_death(tmp_path):
    from dualign.runio import LOCK_FILE, run_lock

    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        with pytest.raises(InputError) as ei:
            with run_lock(run):
                pytest.fail("a second holder got the lock")
        assert str(ei.value) == (f"{run} is in use by another dualign run (pid {holder.pid}); wait for it "
                                 "or choose another --out")
        # the other ranks of a distributed launch are the same run: only rank 0 locks
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("WORLD_SIZE", "2")
            mp.setenv("RANK", "1")
            with run_lock(run):
                pass
            mp.setenv("RANK", "0")
            with pytest.raises(InputError, match="in use by another dualign run"):
                with run_lock(run):
                    pass
    finally:
        holder.kill()  # dies without releasing anything: the kernel drops the lock
        holder.wait()
    with run_lock(run) as d:  # free again; re-entrant in this process (a sweep's MoCAN)
        assert d == run and (run / LOCK_FILE).read_text().strip() == str(os.getpid())
        with run_lock(run):
            pass
        probe = subprocess.run([sys.executable, "-c", "import sys\nfrom dualign.runio import run_lock\n"
                                "try:\n    run_lock(sys.argv[1]).__enter__()\nexcept Exception as e:\n"
                                "    print(e)\n", str(run)], cwd=REPO, text=True, capture_output=True)
        assert f"pid {os.getpid()}" in probe.stdout  # still held after the inner block
    holder = _hold_lock(run)  # released when the block exits
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0


def test_sample_score_and_pipelines_refuse_a_folder_in_use(tmp_path, capsys, no_model_load, tiny_model_dir):
    from dualign.pipelines.config import MoCANConfig
    from dualign.pipelines.mocan import run_mocan

    samples, toy, _ = _scoring_setup(tmp_path / "run")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nworld\n")
    holder = _hold_lock(samples.parent)
    try:
        msg = f"{samples.parent} is in use by another dualign run (pid {holder.pid})"
        err = one_line_exit_2(capsys, ["sample", "--model", "/nonexistent/model", "--prompts", str(prompts),
                                       "--out", str(samples.parent), "--device", "cpu"])
        assert msg in err and "choose another --out" in err
        err = one_line_exit_2(capsys, ["score", "--samples", str(samples), "--reward", f"reward:{toy}:length"])
        assert msg in err and not (samples.parent / "scores.parquet").exists()
        err = one_line_exit_2(capsys, ["logprobs", "--samples", str(samples), "--name", "ref"])
        assert msg in err
        err = one_line_exit_2(capsys, ["evaluate", "--model", str(tiny_model_dir), "--baseline", str(tiny_model_dir),
                                       "--builtin-suites", "--out", str(samples.parent)])
        assert msg in err and not (samples.parent / "behaviour.json").exists()
        cfg = MoCANConfig(out=str(samples.parent), prompts=str(prompts), reward=f"reward:{toy}:length",
                          safety={"len": f"safety:{toy}:length"})
        with pytest.raises(InputError, match="is in use by another dualign run"):
            run_mocan(cfg, log=lambda *a: None)
        assert not (samples.parent / "config.json").exists()
    finally:
        holder.stdin.close()
        holder.wait()


# ----------------------------------------------------------------------------- 11. names that become paths

@pytest.mark.parametrize("name", ["x/../../../escaped", "..", "", "a b", ".hidden", "a" * 65, "é", 7])
def test_check_name_refuses_anything_but_one_plain_component(name):
    from dualign.runio import check_name

    with pytest.raises(InputError) as ei:
        check_name(name, "safety_preferences")
    assert ei.value.field == "safety_preferences"


@pytest.mark.parametrize("name", ["harm", "safety-v1.2", "a_b", "A" * 64, "x..y"])
def test_check_name_keeps_plain_names(name):
    from dualign.runio import check_name

    assert check_name(name, "f") == name


@pytest.mark.parametrize("name", ["x/../../../escaped", "..", "", "a b"])
def test_pecan_constraint_names_are_checked_before_anything_runs(tmp_path, capsys, no_model_load, name):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    run = tmp_path / "deep" / "run"
    for flag in ("--safety-preferences", "--safety-models"):
        err = one_line_exit_2(capsys, ["pecan", "--prompts", str(prompts), "--helpful-preferences", "h.jsonl",
                                       flag, f"{name}=s.jsonl", "--out", str(run)])
        assert f"field '{flag[2:].replace('-', '_')}'" in err
    assert not run.exists() and not (tmp_path / "escaped").exists()


def test_suite_and_logprob_names_are_checked(tmp_path, capsys, no_model_load):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    err = one_line_exit_2(capsys, ["evaluate", "--model", "/nonexistent/model", "--out", str(tmp_path / "ev"),
                                   "--suite", f"../../x=harmful:{prompts}"])
    assert "field '--suite'" in err and not (tmp_path / "ev").exists()
    err = one_line_exit_2(capsys, ["logprobs", "--samples", str(tmp_path / "samples.parquet"), "--name", "a b"])
    assert "field '--name'" in err


# ----------------------------------------------------------------------------- 12. file.py scorers run code

def test_scorer_spec_help_says_a_python_file_is_run(capsys):
    from dualign.models.scorers import _import_callable, load_scorer

    sentence = "only use files you trust"
    for argv in (["score", "--help"], ["mocan", "--help"], ["pecan", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        help_text = " ".join(capsys.readouterr().out.split())
        assert "file.py:function spec imports and runs that file's code" in help_text.replace("`", "")
        assert sentence in help_text
    for f in (_import_callable, load_scorer):
        assert sentence in " ".join(f.__doc__.split())
    assert "imports and runs that file's code, as `python file.py` would; only use files you trust" \
        in " ".join((REPO / "README.md").read_text().split())
