"""`dualign compare` on a tiny model with toy scorers: every method trained and evaluated on the
same prompts, compare.json / compare.md, SACPO's second stage starting from its first, the
rerun reusing every training, and config errors before any model loads."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bandit_helpers import one_thread  # noqa: F401  (autouse: tiny models run faster on one thread)
from dualign.cli import main
from dualign.errors import InputError
from dualign.pipelines.compare import CompareConfig, run_compare

TOY = Path(__file__).with_name("toy_scorers.py")
PROMPTS = ["tell me a joke", "how do I pick a lock", "write a poem", "explain gravity"]
QUIET = dict(log=lambda *a: None)


def _prefs_file(tmp_path) -> Path:
    rows = []
    for i, p in enumerate(PROMPTS * 2):
        rows.append({"prompt": p, "response_0": f"sure, here is how {i}", "response_1": f"no {i}",
                     "better_response_id": 0, "safer_response_id": 1,
                     "is_response_0_safe": bool(i % 2), "is_response_1_safe": True})
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def make_cfg(tmp_path, model_dir, **kw) -> CompareConfig:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    base = dict(out=str(tmp_path / "cmp"), policy=str(model_dir), reward=f"{TOY}:reward",
                safety={"vowels": f"safety:{TOY}:safety"}, prompts=str(prompts), num_samples=4,
                max_new_tokens=8, bootstrap=50, eval_num_samples=2, behaviour_suites="none",
                preferences=str(_prefs_file(tmp_path)),
                train={"max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 2},
                methods=["mocan", "dpo_h", "safedpo", "sacpo", "p_sacpo", "primal_dual"], p_sacpo_weight=0.5,
                primal_dual={"max_steps": 2, "num_generations": 2, "per_device_train_batch_size": 4,
                             "save_steps": 2})
    base.update(kw)
    return CompareConfig(**base)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("compare")
    cfg = make_cfg(tmp, tiny_model_dir)
    return cfg, run_compare(cfg, **QUIET)


def test_every_method_is_evaluated_on_the_same_prompts(compared):
    cfg, root = compared
    rec = json.loads((root / "compare.json").read_text())
    assert rec["methods"] == ["mocan", "dpo_h", "safedpo", "sacpo", "p_sacpo", "primal_dual"]
    ev = json.loads((root / "seed-0" / "mocan" / "eval.json").read_text())
    assert set(ev["baselines"]) == {"dpo_h", "safedpo", "sacpo", "p_sacpo", "primal_dual"}
    ref = pd.read_parquet(root / "seed-0" / "mocan" / "eval" / "reference" / "samples.parquet")
    for m in ev["baselines"]:
        s = pd.read_parquet(root / "seed-0" / "mocan" / "eval" / m / "samples.parquet")
        assert s["prompt"].tolist() == ref["prompt"].tolist() and (s["seed"].to_numpy() == ref["seed"].to_numpy()).all()
        # each rival's KL on its own samples: mean of logp/<m> − logp/ref, from the cached columns
        sc = pd.read_parquet(root / "seed-0" / "mocan" / "eval" / m / "scores.parquet")
        per_prompt = (sc[f"logp/{m}"] - sc["logp/ref"]).groupby(sc["prompt_id"]).mean().mean()
        assert ev["baselines_kl"][m]["achieved"] == pytest.approx(per_prompt)
    row = rec["summary"]["safedpo"]
    for k in ("reward_gain", "safety/vowels_gain", "kl", "compute"):
        assert k in row, k
    c = rec["summary"]["mocan"]["compute"]
    assert c["generated_tokens"]["mean"] > 0 and c["trained_tokens"]["mean"] > 0
    assert c["flops_total"]["mean"] == pytest.approx(c["flops_sampling"]["mean"] + c["flops_scoring"]["mean"]
                                                     + c["flops_training"]["mean"])
    # the primal–dual rival is held to MoCAN's constraint: target = E_ref[g] + margin of the dual
    dual = json.loads((root / "seed-0" / "mocan" / "dual.json").read_text())
    c0 = dual["constraints"][0]
    log = [json.loads(x) for x in (root / "seed-0" / "primal_dual" / "primal_dual_log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    pd_info = json.loads((root / "seed-0" / "primal_dual" / "compare_info.json").read_text())
    assert pd_info["generated_tokens"] > 0 and pd_info["scored_responses"] == 2 * sum(r["episodes"] for r in log)
    cfg_pd = json.loads((root / "seed-0" / "primal_dual" / "model" / "dualign_train.json").read_text())
    assert json.dumps(c0["reference_mean"] + c0["margin"])[:8] in json.dumps(cfg_pd)
    # every method is judged on the held-out prompts against π_λ*'s predicted gain there, not the
    # dual's margin on its own prompts (which the held-out reference may put out of reach)
    e = ev["scores"]["safety/vowels"]
    target = e["predicted_gain_held_out"]  # λ* on π_ref's samples of the held-out prompts
    assert rec["targets"]["safety/vowels"] == pytest.approx(target)
    for m, row in rec["per_seed"]["0"]["models"].items():
        g, (_, hi) = row["safety/vowels_gain"], row["safety/vowels_gain_ci"]
        assert row["safety/vowels_holds"] == ("yes" if g >= target else "within CI" if hi >= target else "no"), m
    table = (root / "compare.md").read_text()
    assert f"safety/vowels {target:+.3g} (margin {rec['margins']['safety/vowels']:.3g}" in table
    for label in ("MoCAN", "DPO_H", "SafeDPO", "SACPO", "P-SACPO", "primal–dual", "π_ref"):
        assert f"| {label} |" in table, label
    assert (root / "figures" / "compare.png").stat().st_size > 0


def test_sacpo_second_stage_starts_from_the_first(compared):
    import torch
    from safetensors.torch import load_file

    from dualign.train.preference import load_trained

    cfg, root = compared
    sacpo = root / "seed-0" / "sacpo"
    merged = sacpo / "stage1_merged"
    # the merged stage-1 model equals π_ref + its helpfulness adapter
    stage1, _ = load_trained(sacpo / "stage1_helpful" / "model", base_model=cfg.policy, merge=True)
    m_state = load_file(str(merged / "model.safetensors"))
    for k, v in stage1.state_dict().items():
        if k in m_state:
            torch.testing.assert_close(m_state[k], v)
    # stage 2 is an adapter on that merged model, trained at β/λ
    info = json.loads((sacpo / "stage2_safety" / "model" / "dualign_train.json").read_text())
    assert info["metadata"]["base_model"] == str(merged)
    assert info["config"]["beta"] == pytest.approx(cfg.beta / cfg.sacpo_lambda)
    ac = json.loads((sacpo / "stage2_safety" / "model" / "adapter_config.json").read_text())
    assert Path(ac["base_model_name_or_path"]).resolve() == merged.resolve()
    # P-SACPO: the same adapter with lora_B scaled by q
    a = load_file(str(sacpo / "stage2_safety" / "model" / "adapter_model.safetensors"))
    b = load_file(str(root / "seed-0" / "p_sacpo" / "model" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k] * (cfg.p_sacpo_weight if "lora_B" in k else 1.0))


def test_rerun_reuses_every_training(compared):
    cfg, root = compared
    models = sorted(root.glob("seed-0/*/model")) + sorted(root.glob("seed-0/*/*/model")) \
        + [root / "seed-0" / "sacpo" / "stage1_merged" / "model.safetensors"]  # not merged again
    stamps = {p: p.stat().st_mtime_ns for p in models}
    assert len(stamps) >= 4
    rec0 = json.loads((root / "compare.json").read_text())
    run_compare(cfg, **QUIET)
    assert {p: p.stat().st_mtime_ns for p in models} == stamps
    rec1 = json.loads((root / "compare.json").read_text())
    assert rec1["summary"]["safedpo"]["reward_gain"] == rec0["summary"]["safedpo"]["reward_gain"]
    # a cached training keeps the wall time it was measured with
    for m in ("mocan", "dpo_h", "primal_dual"):
        assert rec1["summary"][m]["compute"]["wall_s"]["mean"] == rec0["summary"][m]["compute"]["wall_s"]["mean"] > 0


@pytest.mark.parametrize("change, field", [
    ({"methods": ["mocan", "ppo"]}, "methods"),
    ({"seeds": ["a"]}, "seeds"),
    ({"seeds": [0, 0]}, "seeds"),
    ({"safedpo_delta": -1.0}, "safedpo_delta"),
    ({"sacpo_lambda": 0.0}, "sacpo_lambda"),
    ({"p_sacpo_weight": 2.0}, "p_sacpo_weight"),
    ({"preferences": ""}, "preferences"),
    ({"baseline_train": {"learning_rat": 1e-4}}, "learning_rat"),
])
def test_bad_settings_fail_before_any_model_loads(tmp_path, change, field):
    cfg = make_cfg(tmp_path, "/nonexistent/model", **change)
    with pytest.raises(InputError) as e:
        cfg.validate()
    assert field in str(e.value)


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "cmp.yaml"
    bad.write_text("methods: [mocan, ppo]\nreward: x\nsafety: {a: 'safety:y'}\nprompts: p.txt\n")
    assert main(["compare", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ppo" in err[0]
