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
    bs = bootstrap.bootstrap_dual(r, g, 0.1, 0.1, n_boot=30)
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
