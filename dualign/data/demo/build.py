"""Regenerate the built-in demo dataset from the hand-written records next to this file.

    python dualign/data/demo/build.py [--scorers]

Writes preferences_train.jsonl, preferences_test.jsonl, prompts.jsonl and
refusal_check.jsonl into this directory. With `--scorers`, then trains the demo reward and
cost heads on the result (about 4 minutes on 2 cores) and writes them here with their
manifest (demo_scorer_*.json/.safetensors, demo_scorers.json), which the package ships so
that `make demo` need not train them; run it after every change of the data.
Deterministic: the split and the order of the two responses in each pair come from a fixed
seed, so rerunning reproduces the files byte for byte. See DATASET_CARD.md for what the
records are and how the labels are set.
"""
from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from records_benign import BENIGN  # noqa: E402
from records_edgy import EDGY  # noqa: E402
from records_harmful import HARMFUL  # noqa: E402
from records_long import LONG  # noqa: E402
from records_long_benign import LONG_BENIGN  # noqa: E402
from records_prompts import CHECK, PROMPTS  # noqa: E402
from records_stock_refusals import MIRRORED_REFUSALS, STOCK_REFUSALS  # noqa: E402

SEED = 20240527
TEST_FRACTION = 0.2


def _pair(rng, prompt, category, good, bad, *, better_good: bool, safer_good: bool,
          good_safe: bool, bad_safe: bool, kind: str) -> dict:
    """One PKU-SafeRLHF record with the two answers in random order."""
    swap = rng.random() < 0.5  # position must carry no signal
    r = [bad, good] if swap else [good, bad]
    safe = [bad_safe, good_safe] if swap else [good_safe, bad_safe]
    good_id = 1 if swap else 0
    return {
        "prompt": prompt,
        "response_0": r[0],
        "response_1": r[1],
        "better_response_id": good_id if better_good else 1 - good_id,
        "safer_response_id": good_id if safer_good else 1 - good_id,
        "is_response_0_safe": safe[0],
        "is_response_1_safe": safe[1],
        "category": category,
        "harmful": category in HARMFUL,
        "pair_kind": kind,
    }


def preference_records(rng: random.Random) -> list[dict]:
    out = []
    for cat, items in HARMFUL.items():
        for item, long_comply in zip(items, LONG[cat]):
            prompt, refusal, comply = item[:3]
            curt = len(item) > 3 and item[3] == "c"
            # The refusal is always the safer one; the compliance is always the better one, as
            # a helpfulness-only rater labels it (PKU-SafeRLHF's convention): helpfulness and
            # safety disagree on every harmful pair, and only the constraint (λ*) makes the
            # refusal win. Each harmful prompt has two pairs: against a short compliance and
            # against a long one in the register of small instruction-tuned models (records_long.py).
            for c, tag in ((comply, ""), (long_comply, "long_")):
                out.append(_pair(rng, prompt, cat, refusal, c, better_good=False,
                                 safer_good=True, good_safe=True, bad_safe=False,
                                 kind=f"curt_refusal_vs_{tag}compliance" if curt
                                 else f"refusal_vs_{tag}compliance"))
    for cat, items in BENIGN.items():
        longs = LONG_BENIGN.get(cat, [])
        for i, (prompt, helpful, bad, kind) in enumerate(items):
            # Both safe; the helpful answer is better. The safer one is the answer that says
            # less (refusal/evasion), except against a wrong answer, which can mislead. The
            # first five prompts of a category also get a long, step-by-step helpful answer
            # (records_long_benign.py) against the same bad one.
            for h, tag in [(helpful, "")] + ([(longs[i], "long_")] if i < len(longs) else []):
                out.append(_pair(rng, prompt, cat, h, bad, better_good=True,
                                 safer_good=(kind == "wrong"), good_safe=True, bad_safe=True,
                                 kind=f"{tag}helpful_vs_{kind}"))
    # every benign prompt without a hand-written refusal also gets its helpful answer against a
    # stock refusal (records_stock_refusals.py), in turn: over-refusal loses on helpfulness
    # (both safe; the refusal says less, so it is the safer one, as for hand-written refusals)
    stock = itertools.cycle(STOCK_REFUSALS)
    for cat, items in BENIGN.items():
        for prompt, helpful, _, kind in items:
            if kind != "refuse":
                out.append(_pair(rng, prompt, cat, helpful, next(stock), better_good=True,
                                 safer_good=False, good_safe=True, bad_safe=True,
                                 kind="helpful_vs_stock_refusal"))
    # requests that only sound harmful (records_edgy.py), each with its own needless refusal:
    # where a policy trained on refusals over-refuses most
    for items in EDGY.values():
        for prompt, helpful, refusal in items:
            out.append(_pair(rng, prompt, "edgy_benign", helpful, refusal, better_good=True,
                             safer_good=False, good_safe=True, bad_safe=True, kind="helpful_vs_refuse"))
    # every benign prompt, edgy ones included, also gets its helpful answer against a refusal
    # worded like the harmful prompts' chosen refusals (records_stock_refusals.py), in turn: the
    # same openers win on harmful prompts and lose on benign ones
    mirrored = itertools.cycle(MIRRORED_REFUSALS)
    benign = [(cat, prompt, helpful) for cat, items in BENIGN.items() for prompt, helpful, _, _ in items]
    benign += [("edgy_benign", prompt, helpful) for items in EDGY.values() for prompt, helpful, _ in items]
    for cat, prompt, helpful in benign:
        out.append(_pair(rng, prompt, cat, helpful, next(mirrored), better_good=True,
                         safer_good=False, good_safe=True, bad_safe=True, kind="helpful_vs_mirrored_refusal"))
    return out


def split(records: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """~80/20 split by prompt (all pairs of a prompt on one side), stratified by category."""
    train, test = [], []
    by_cat: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        by_cat.setdefault(r["category"], {}).setdefault(r["prompt"], []).append(r)
    for cat in sorted(by_cat):
        prompts = sorted(by_cat[cat])
        rng.shuffle(prompts)
        n_test = max(1, round(TEST_FRACTION * len(prompts)))
        test += [r for p in prompts[:n_test] for r in by_cat[cat][p]]
        train += [r for p in prompts[n_test:] for r in by_cat[cat][p]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def prompt_records(rng: random.Random) -> list[dict]:
    """Prompts with a train/eval split: a third of each category is held out for evaluation."""
    by_cat: dict[str, list[str]] = {}
    for cat, p in PROMPTS:
        by_cat.setdefault(cat, []).append(p)
    out = []
    for cat in sorted(by_cat):
        ps = by_cat[cat][:]
        rng.shuffle(ps)
        n_eval = round(len(ps) / 3)
        for i, p in enumerate(ps):
            out.append({"prompt": p, "category": cat, "harmful": cat in HARMFUL,
                        "split": "eval" if i < n_eval else "train"})
    rng.shuffle(out)
    for i, r in enumerate(out):
        r["prompt_id"] = f"demo-{i:03d}"
    return out


def check_records() -> list[dict]:
    return [{"prompt": p, "refusal": ref, "compliance": comp, "category": cat}
            for cat, p, ref, comp in CHECK]


def _write_jsonl(records, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    # one generator per stage, so that editing one set of records leaves the others' order,
    # split and ids unchanged
    prefs = preference_records(random.Random(SEED))
    train, test = split(prefs, random.Random(SEED + 1))
    prompts = prompt_records(random.Random(SEED + 2))
    check = check_records()
    _write_jsonl(train, HERE / "preferences_train.jsonl")
    _write_jsonl(test, HERE / "preferences_test.jsonl")
    _write_jsonl(prompts, HERE / "prompts.jsonl")
    _write_jsonl(check, HERE / "refusal_check.jsonl")
    n_h = sum(r["harmful"] for r in prefs)
    n_p_h = sum(r["harmful"] for r in prompts)
    print(f"preferences: {len(prefs)} pairs on {len({r['prompt'] for r in prefs})} prompts "
          f"({n_h} harmful, {len(prefs) - n_h} benign), "
          f"train {len(train)}, test {len(test)}, "
          f"categories {len({r['category'] for r in prefs})}")
    print(f"prompts: {len(prompts)} ({n_p_h} harmful), "
          f"train {sum(r['split'] == 'train' for r in prompts)}, "
          f"eval {sum(r['split'] == 'eval' for r in prompts)}")
    print(f"refusal check: {len(check)}")
    if "--scorers" in sys.argv[1:]:
        from dualign.train.demo_scorers import ship_demo_scorers

        print(f"demo scorers: {ship_demo_scorers()}")


if __name__ == "__main__":
    main()
