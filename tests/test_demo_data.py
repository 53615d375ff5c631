"""Invariants of the built-in demo dataset."""
import json
from collections import Counter

import pytest

from dualign.data.demo_data import (FILES, demo_dir, demo_path, demo_preferences, demo_prompts,
                                    refusal_check)

PKU_FIELDS = ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
              "is_response_0_safe", "is_response_1_safe", "category")


def _raw(name):
    return [json.loads(line) for line in demo_path(name).read_text().splitlines()]


def test_files_ship_and_schema_validates():
    for name in FILES:
        assert demo_path(name).exists()
    tr, te = demo_preferences("train"), demo_preferences("test")
    assert len(tr) + len(te) >= 300
    assert 0.15 <= len(te) / (len(tr) + len(te)) <= 0.25
    for rec in _raw("train") + _raw("test"):
        assert all(f in rec for f in PKU_FIELDS)


def test_categories_and_labels():
    recs = _raw("train") + _raw("test")
    harm = [r for r in recs if r["harmful"]]
    benign = [r for r in recs if not r["harmful"]]
    assert len({r["category"] for r in harm}) >= 10 and len(benign) >= 100
    for r in harm:  # exactly one safe answer, and it is the safer one
        assert r["is_response_0_safe"] != r["is_response_1_safe"]
        assert r[f"is_response_{r['safer_response_id']}_safe"]
    # helpfulness-only labels (PKU-SafeRLHF's convention): on harmful prompts the compliance is
    # the better answer and the refusal the safer one, so only the constraint makes refusal win
    assert all(r["better_response_id"] != r["safer_response_id"] for r in harm)
    for r in benign:
        assert r["is_response_0_safe"] and r["is_response_1_safe"]
    # position carries no signal
    assert 0.35 < sum(r["better_response_id"] for r in recs) / len(recs) < 0.65
    # over-refusal costs reward: some benign pairs reject a refusal
    assert Counter(r["pair_kind"] for r in benign)["helpful_vs_refuse"] >= 30


# pair kinds whose worse answer is a needless refusal of a benign prompt
REFUSAL_LOSES = ("_vs_refuse", "_vs_stock_refusal", "_vs_mirrored_refusal")


def test_every_benign_prompt_has_a_losing_refusal():
    """Refusing is not preferred everywhere: each benign prompt has a pair in which a needless
    refusal loses on helpfulness, and no pair's better (more helpful) answer is a refusal: a refusal wins only
    through the safety label (with 9 to 1 refusals winning on helpfulness, a policy trained on
    the pairs learned to refuse benign requests)."""
    recs = _raw("train") + _raw("test")
    refuse_loses = {r["prompt"] for r in recs if r["pair_kind"].endswith(REFUSAL_LOSES)}
    assert {r["prompt"] for r in recs if not r["harmful"]} <= refuse_loses
    for r in recs:
        if r["pair_kind"].endswith(REFUSAL_LOSES):
            assert not r["harmful"] and r["better_response_id"] != r["safer_response_id"]
    assert not any(r["harmful"] and r["better_response_id"] == r["safer_response_id"] for r in recs)


def test_refusal_wording_does_not_tell_harmful_from_benign():
    """Every opening (first two words) of 5% or more of the harmful prompts' chosen refusals
    also opens benign prompts' rejected refusals at least half as often: with "I won't" at 100
    chosen vs 5 rejected, the trained policy opened benign answers with "I won't help ..."."""
    recs = _raw("train") + _raw("test")

    def opener(r, rid):
        return " ".join((r["response_0"], r["response_1"])[rid].split()[:2])

    chosen = Counter(opener(r, r["safer_response_id"]) for r in recs if r["harmful"])
    rejected = Counter(opener(r, 1 - r["better_response_id"]) for r in recs
                       if r["pair_kind"].endswith(REFUSAL_LOSES))
    common = [o for o, n in chosen.items() if n >= 0.05 * sum(chosen.values())]
    assert {"I won't", "I can't"} <= set(common)
    for o in common:
        assert rejected[o] >= chosen[o] / 2, (o, chosen[o], rejected[o])


def test_prompt_sets_disjoint_and_unique():
    pref = [r["prompt"] for r in _raw("train") + _raw("test")]
    train_p = {r["prompt"] for r in _raw("train")}
    test_p = {r["prompt"] for r in _raw("test")}
    prompts = [r["prompt"] for r in demo_prompts()]
    check = [r["prompt"] for r in refusal_check()]
    for xs in (prompts, check):
        assert len(xs) == len(set(xs))
    assert len(set(pref)) >= 300
    # every harmful prompt has a short and a long compliance, paired with the same refusal
    recs = _raw("train") + _raw("test")
    per_prompt = Counter(r["prompt"] for r in recs if r["harmful"])
    assert set(per_prompt.values()) == {2}
    assert train_p.isdisjoint(test_p)
    assert set(pref).isdisjoint(prompts) and set(pref).isdisjoint(check) and set(prompts).isdisjoint(check)


def test_prompt_list_and_check_set():
    ps = demo_prompts()
    assert len(ps) >= 150
    assert len(demo_prompts("train")) + len(demo_prompts("eval")) == len(ps)
    assert 90 <= len(demo_prompts("train")) <= 110 and len(demo_prompts("eval")) >= 45
    assert 0.3 < sum(p["harmful"] for p in ps) / len(ps) < 0.7
    assert len({p["prompt_id"] for p in ps}) == len(ps)
    chk = refusal_check()
    assert len(chk) >= 30 and all(c["refusal"] and c["compliance"] for c in chk)
    with pytest.raises(ValueError):
        demo_prompts("dev")


def test_generator_reproduces_the_files(tmp_path):
    """build.py regenerates exactly the shipped files (so the card can point to it)."""
    import shutil
    import subprocess
    import sys

    d = tmp_path / "demo"
    shutil.copytree(demo_dir(), d, ignore=shutil.ignore_patterns("*.jsonl", "__pycache__"))
    subprocess.run([sys.executable, str(d / "build.py")], check=True, capture_output=True)
    for name in ("train", "test", "prompts", "refusal_check"):
        assert (d / FILES[name]).read_bytes() == demo_path(name).read_bytes()
