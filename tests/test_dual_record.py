"""`DualRecord`, the dual stage's one result type: it writes dual.json byte for byte as the
hand-built dict did, reads back every dual.json that code wrote, and names the file and the
field of a record it cannot read.

The golden files in tests/data/dual_record were written by the code before `DualRecord`
(commit 357ed8e): `<case>.dual.json`, and what its readers made of it (the summary, the
held-out prediction, eval.json's scores, report.md). demo.dual.json is a demo run's.
The one field added since, the predictions without their K-sample bias (`bias_corrected`),
is taken out before the comparison (its values are tested in tests/test_sample_bias.py), so
everything else is still checked against the code before `DualRecord`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dual_records import GOLDEN, golden_record

from dualign.data.scores import ScoreArrays
from dualign.errors import InputError
from dualign.eval.report import write_report
from dualign.eval.summary import compare_scores
from dualign.pipelines.dual_stage import (ConstraintRecord, DualRecord, PredictedRecord, format_dual_summary,
                                          held_out_prediction, solve_dual_stage, write_dual_outputs)

# the cases the golden files were made from: the same data, settings and order of calls
CASES = {
    "margins": dict(seed=0, names=["safety/harm", "safety/tox"], beta=0.5, margins=[0.2, 0.1],
                    kw=dict(inputs={"scores": "scores.parquet"})),
    "rate": dict(seed=1, names=["safety/harm", "safety/tox"], beta=0.5, margins=[0.0, 0.1],
                 kw=dict(max_unsafe_rate=[0.15, None])),
    "unsigned": dict(seed=2, names=["safety/harmless"], beta=0.3, margins=[0.1],
                     kw=dict(sign_means_unsafe=False, bootstrap_method="one_step")),
}


def _data(seed, n=12, k=4, m=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, k)), rng.normal(0.3, 1.0, size=(n, k, m))


def _table(reward, safety, names):
    n, k = reward.shape
    cols = {"prompt_id": np.repeat(np.arange(n), k), "sample_id": np.tile(np.arange(k), n), "reward": reward.ravel()}
    for j, nm in enumerate(names):
        cols[nm] = safety[:, :, j].ravel()
    return pd.DataFrame(cols)


def _same(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where  # same keys, same order
        for k in want:
            _same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), where
    else:
        assert got == want, where


def assert_same_json(got, path: Path) -> None:
    """`got` (anything json.dumps takes) is the golden file at `path`: the same keys in the same
    order and the same values, floats to 1e-9 relative. Not byte for byte: the last digit of a
    float depends on the CPU's vector paths (on another machine than the one that wrote them,
    the files differed in a 16th digit)."""
    _same(json.loads(json.dumps(got)), json.loads(path.read_text()), path.name)


@pytest.mark.parametrize("name", list(CASES))
def test_the_record_writes_and_is_read_as_the_hand_built_dict_was(name, tmp_path):
    c = CASES[name]
    reward, safety = _data(c["seed"], m=len(c["names"]))
    scores = ScoreArrays(reward, safety, c["names"], np.arange(reward.shape[0]))
    d = solve_dual_stage(scores, c["beta"], c["margins"], n_boot=20, progress=False, seed=0, **c["kw"])
    assert isinstance(d, DualRecord)
    write_dual_outputs(d, scores, tmp_path / "dual.json")
    written = json.loads((tmp_path / "dual.json").read_text())
    assert set(written["predicted"].pop("bias_corrected")) == {"reward_gain", "safety_gain", "kl", "k",
                                                               "relative_shift"}
    assert_same_json(written, GOLDEN / f"{name}.dual.json")
    summary = format_dual_summary(d).splitlines(keepends=True)
    assert sum(line.startswith("  without the bias of K") for line in summary) == 1
    assert "".join(line for line in summary if not line.startswith("  without the bias of K")) + "\n" == \
        (GOLDEN / f"{name}.summary.txt").read_text()
    # the readers: held-out prediction, eval.json's scores, report.md
    hr, hs = _data(c["seed"] + 100, n=8, k=3, m=len(c["names"]))
    h = held_out_prediction(d, ScoreArrays(hr, hs, c["names"], np.arange(8)), n_boot=30, seed=1)
    held = h.to_json()
    assert held.pop("bias_corrected")["k"] == 3
    assert_same_json(held, GOLDEN / f"{name}.held_out.json")
    ref, tr = _table(hr, hs, c["names"]), _table(hr + 0.2, hs + 0.1, c["names"])
    unsigned = [] if c["kw"].get("sign_means_unsafe", True) else c["names"]
    sc = compare_scores(ref, tr, reward="reward", safety=c["names"], unsigned=unsigned, dual=d, held_out=h,
                        n_boot=30, seed=0)
    for entry in sc.values():  # the bias-corrected predictions, added since (see the module docstring)
        entry.pop("predicted_gain_corrected", None)
        entry.pop("predicted_gain_held_out_corrected", None)
    # the "within the CI" flags are checked against the entry's own numbers: the synthetic trained
    # scores are the reference + 0.1 exactly, so a prediction of 0.1 sits on the CI's edge and the
    # flag follows the last bit of the float
    want = json.loads((GOLDEN / f"{name}.eval_scores.json").read_text())
    for col, entry in sc.items():
        lo, hi = entry["achieved_gain_ci"]
        for flag, pred in (("prediction_within_achieved_ci", "predicted_gain"),
                           ("held_out_prediction_within_achieved_ci", "predicted_gain_held_out")):
            if flag in want[col]:
                assert entry[flag] == (lo <= entry[pred] <= hi), (col, flag)
                want[col][flag] = entry[flag]
    _same(json.loads(json.dumps(sc)), want, f"{name}.eval_scores.json")
    record = {"method": "mocan", "n_eval_prompts": 8, "n_samples_per_prompt": 3, "scores": sc,
              "kl": {"achieved": 0.4, "achieved_ci": [0.1, 0.7], "note": "synthetic"},
              "train": {"n_pairs": 10, "global_step": 3, "train_loss": 0.5, "model_dir": "m"}}
    assert write_report(tmp_path, {"policy": "tiny"}, d, record).read_text() == \
        (GOLDEN / f"{name}.report.md").read_text()
    # the record read back from its file is the record solved
    assert DualRecord.read(tmp_path / "dual.json") == d


@pytest.mark.parametrize("name", [*CASES, "demo"])
def test_an_existing_dual_json_round_trips(name):
    path = GOLDEN / f"{name}.dual.json"
    d = json.loads(path.read_text())
    rec = DualRecord.from_json(d, str(path))
    assert rec.to_json() == d
    # same keys in the same order: the file it would write is the file it read
    assert json.dumps(rec.to_json(), indent=2) + "\n" == path.read_text()
    assert rec.lam == tuple(d["lambda"]) and rec.names == [c["name"] for c in d["constraints"]]
    assert rec.predicted.kl_ci == tuple(d["predicted"]["kl_ci"])


def test_typed_parts_read_as_the_json_says():
    rate, unsigned = golden_record("rate"), golden_record("unsigned")
    harm, tox = rate.constraints
    assert isinstance(harm, ConstraintRecord) and isinstance(rate.predicted, PredictedRecord)
    assert harm.is_rate and harm.score == "-1{safety/harm < 0}" and harm.max_unsafe_rate == 0.15
    assert not tox.is_rate and tox.max_unsafe_rate is None and tox.min_unsafe_rate is None
    assert rate.constraint("safety/tox") is tox and rate.constraint("safety/other") is None
    assert rate.predicted.unsafe_rate == {"safety/harm": harm.predicted_unsafe_rate,
                                          "safety/tox": tox.predicted_unsafe_rate}
    # scores without a sign: no unsafe rates anywhere, and none written
    assert unsigned.predicted.unsafe_rate is None and unsigned.constraints[0].unsafe_rate_reference is None
    assert "unsafe_rate" not in unsigned.to_json()["predicted"]
    assert "unsafe_rate_reference" not in unsigned.to_json()["constraints"][0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rate.beta = 1.0


def _broken(tmp_path, edit) -> Path:
    d = json.loads((GOLDEN / "rate.dual.json").read_text())
    edit(d)
    path = tmp_path / "dual.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("lambda"), "field 'lambda'"),
    (lambda d: d.pop("n_samples_per_prompt"), "field 'n_samples_per_prompt'"),
    (lambda d: d["predicted"].pop("kl_ci"), "field 'predicted.kl_ci'"),
    (lambda d: d["constraints"][1].pop("reference_mean"), "field 'constraints[1].reference_mean'"),
    (lambda d: d.update(constraints={"a": 1}), "field 'constraints'"),
    (lambda d: d["constraints"].__setitem__(0, [1, 2]), "field 'constraints[0]'"),
    (lambda d: d["predicted"].update(kl_ci=None), "field 'predicted.kl_ci'"),
    (lambda d: d.update(margins=[0.1]), "field 'margins'"),
    (lambda d: d.update(bootstrap=[]), "field 'bootstrap'"),
    (lambda d: d.update(beta="0.5"), "field 'beta': expected a number"),
    (lambda d: d.update(n_prompts=12.0), "field 'n_prompts': expected an integer"),
    (lambda d: d["constraints"][0].update(active=1), "field 'constraints[0].active': expected true or false"),
    (lambda d: d["constraints"][1].update(margin=True), "field 'constraints[1].margin': expected a number"),
    (lambda d: d["constraints"][1].update(max_unsafe_rate="x"), "field 'constraints[1].max_unsafe_rate'"),
])
def test_an_unreadable_record_names_the_file_and_the_field(tmp_path, edit, field):
    path = _broken(tmp_path, edit)
    with pytest.raises(InputError) as e:
        DualRecord.read(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and field in msg and len(msg.splitlines()) == 1
    # from_json names the file it is given
    with pytest.raises(InputError, match="somewhere/dual.json"):
        DualRecord.from_json(json.loads(path.read_text()), "somewhere/dual.json")


def test_a_missing_or_corrupt_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        DualRecord.read(tmp_path / "dual.json")
    (tmp_path / "dual.json").write_text('{"beta": 0.1,')
    with pytest.raises(InputError, match="cannot read a dual record"):
        DualRecord.read(tmp_path / "dual.json")
    (tmp_path / "dual.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="expected a JSON object, got list"):
        DualRecord.read(tmp_path / "dual.json")


def test_the_dual_stage_reads_back_the_record_it_solved(tmp_path):
    from dualign.pipelines.config import MoCANConfig
    from dualign.pipelines.stages import dual_stage

    reward, safety = _data(5, n=10, k=4, m=1)
    table = _table(reward, safety, ["safety/harm"])
    settings = MoCANConfig(beta=0.5, margin_fraction=0.5, bootstrap=20, seed=0)
    first = dual_stage(tmp_path, table, ["safety/harm"], settings, log=lambda _: None)
    logs = []
    again = dual_stage(tmp_path, table, ["safety/harm"], settings, log=logs.append)
    assert isinstance(again, DualRecord) and again == first
    assert not any(line.startswith("margin for") for line in logs)  # cached, not solved again
