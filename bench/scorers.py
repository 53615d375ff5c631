"""Benchmark: score models trained on real human labels, next to the demo-trained ones.

    .venv/bin/python bench/scorers.py [--backbone SPEC] [--pooling last|mean]
                                      [--hh-pairs 500] [--folds 5] [--skip-hh] [--demo]

Trains, on a frozen backbone with features cached under `<dualign cache>/features`:
  (1) reward and cost models on ../shared/data/pku_saferlhf_alpaca7b_test_sample.jsonl
      (300 PKU-SafeRLHF pairs with human helpfulness and harmlessness labels): one 80/20
      split by prompt, plus k-fold cross-validation by prompt for a steadier estimate;
  (2) a cost model (pairwise term only: HH-RLHF has no per-answer safety labels) on a seeded
      subsample of ../shared/data/hh_rlhf_harmless_base_test.jsonl.gz, 80/20 by prompt.
Prints held-out pairwise accuracy (and sign accuracy for PKU cost). For scale: the beaver-7b
reward and cost models are reported at roughly 0.7 pairwise accuracy on PKU-SafeRLHF
(Dai et al. 2023 report ~0.78 reward / ~0.74 cost on their own test split).
With --demo it first reports the demo scorers (`dualign.train.demo_scorers.demo_scorers`): held-out
accuracy on the demo test split, the refusal check (refusal ranked safer than compliance), and
their verdicts on SmolLM2's own greedy answers to the 50 held-out demo prompts.
The real-data part skips cleanly when ../shared/data is absent. The data files are read in place, never copied.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PKU = SHARED / "pku_saferlhf_alpaca7b_test_sample.jsonl"
HH = SHARED / "hh_rlhf_harmless_base_test.jsonl.gz"


def _cv(df, cfg, folds, cache, loaded, seed=0):
    """k-fold by prompt: mean and sd of held-out pairwise (and sign) accuracy."""
    from dualign.train.scorer import train_scorer

    prompts = df["prompt"].unique()
    order = np.random.default_rng(seed).permutation(len(prompts))
    accs, signs = [], []
    for part in np.array_split(order, folds):
        test_p = set(prompts[part])
        is_test = df["prompt"].isin(test_p).to_numpy()
        res = train_scorer(df[~is_test].reset_index(drop=True), cfg, test_df=df[is_test].reset_index(drop=True),
                           cache_dir=cache, loaded=loaded, log=lambda m: None)
        loaded = getattr(res.scorer, "_loaded", loaded)
        accs.append(res.metrics["test"]["pairwise_accuracy"])
        if "sign_accuracy" in res.metrics["test"]:
            signs.append(res.metrics["test"]["sign_accuracy"])
    out = f"{np.mean(accs):.3f} ± {np.std(accs):.3f}"
    if signs:
        out += f" (sign {np.mean(signs):.3f} ± {np.std(signs):.3f})"
    return out, loaded


def demo_report(n_new_tokens: int = 64) -> None:
    """Demo scorers: test-split metrics, refusal check, and SmolLM2's own answers."""
    from dualign.data.demo_data import demo_prompts, refusal_check
    from dualign.models.features import shared_backbone
    from dualign.models.generation import generate_batch
    from dualign.models.head_scorer import HeadScorer
    from dualign.models.text import encode_prompt
    from dualign.train.demo_scorers import demo_scorers
    from dualign.train.scorer import DEFAULT_BACKBONE

    t0 = time.perf_counter()
    r_dir, c_dir = demo_scorers()
    reward, cost = HeadScorer.load(r_dir), HeadScorer.load(c_dir)
    print(f"demo scorers ({time.perf_counter() - t0:.0f}s): {r_dir.parent}")
    for h in (reward, cost):
        print(f"  {h.kind:<6} demo test split: {h.meta['metrics']['test']}")
    chk = refusal_check()
    p = [c["prompt"] for c in chk]
    cr, cc = cost(p, [c["refusal"] for c in chk]), cost(p, [c["compliance"] for c in chk])
    rr, rc = reward(p, [c["refusal"] for c in chk]), reward(p, [c["compliance"] for c in chk])
    print(f"  refusal check ({len(chk)} harmful prompts): cost ranks refusal safer {np.mean(cr < cc):.3f}; "
          f"refusals judged safe (cost<0) {np.mean(cr < 0):.3f}; compliances judged unsafe {np.mean(cc > 0):.3f}; "
          f"reward prefers the refusal {np.mean(rr > rc):.3f}")
    # SmolLM2's own greedy answers to the held-out prompts, in its chat format
    model, tok = shared_backbone(DEFAULT_BACKBONE)
    ev = demo_prompts("eval")
    answers = []
    for i in range(0, len(ev), 10):
        ids = [encode_prompt(tok, r["prompt"]) for r in ev[i:i + 10]]
        for out, _ in generate_batch(model, tok, ids, max_new_tokens=n_new_tokens, temperature=0):
            answers.append(tok.decode(out, skip_special_tokens=True).strip())
    p = [r["prompt"] for r in ev]
    c, rw = cost(p, answers), reward(p, answers)
    harm = np.array([r["harmful"] for r in ev])
    print(f"  SmolLM2 greedy answers ({n_new_tokens} new tokens) to {len(ev)} held-out prompts: "
          f"judged unsafe {np.mean(c[harm] > 0):.2f} of harmful, {np.mean(c[~harm] > 0):.2f} of benign; "
          f"mean reward {rw[harm].mean():+.2f} harmful, {rw[~harm].mean():+.2f} benign")
    for j in list(np.argsort(-c)[:2]) + list(np.argsort(c)[:2]):
        print(f"    cost {c[j]:+.2f} | {p[j][:60]!r} -> {answers[j][:90]!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="smollm2-135m-instruct")
    ap.add_argument("--pooling", default="mean", choices=("last", "mean"))
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--hh-pairs", type=int, default=500, help="HH-RLHF subsample (of 2312) to stay in ~10 min")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--skip-hh", action="store_true")
    ap.add_argument("--cache-dir", help="feature cache (default: <dualign cache>/features)")
    ap.add_argument("--demo", action="store_true", help="first report the demo scorers (see above)")
    args = ap.parse_args(argv)
    if args.demo:
        demo_report()
    if not PKU.exists() and not HH.exists():
        print(f"skipped: {SHARED} is not available")
        return 0

    from dualign.data.preferences import load_preferences
    from dualign.train.scorer import ScorerTrainConfig, split_by_prompt, train_scorer

    t0 = time.perf_counter()
    loaded = None
    rows = []
    if PKU.exists():
        df = load_preferences(PKU, require_safety=True)
        tr, te = split_by_prompt(df, 0.2, seed=0)
        for kind in ("reward", "cost"):
            cfg = ScorerTrainConfig(kind=kind, backbone=args.backbone, pooling=args.pooling,
                                    max_length=args.max_length)
            res = train_scorer(tr, cfg, test_df=te, cache_dir=args.cache_dir, loaded=loaded)
            loaded = getattr(res.scorer, "_loaded", loaded)
            cv, loaded = _cv(df, cfg, args.folds, args.cache_dir, loaded)
            m = res.metrics["test"]
            rows.append((f"PKU-SafeRLHF {kind}", len(tr), len(te), m["pairwise_accuracy"],
                         m.get("sign_accuracy"), cv))
            if "pairwise_accuracy_mixed" in m:
                rows.append((" ..one safe, one unsafe", "", m["n_pairs_mixed"], m["pairwise_accuracy_mixed"],
                             None, "-"))
    else:
        print(f"(no {PKU.name}: PKU rows skipped)")
    if HH.exists() and not args.skip_hh:
        df = load_preferences(HH)
        idx = np.sort(np.random.default_rng(0).permutation(len(df))[:args.hh_pairs])
        df = df.iloc[idx].reset_index(drop=True)
        tr, te = split_by_prompt(df, 0.2, seed=0)
        cfg = ScorerTrainConfig(kind="cost", backbone=args.backbone, pooling=args.pooling,
                                max_length=args.max_length)
        res = train_scorer(tr, cfg, test_df=te, cache_dir=args.cache_dir, loaded=loaded)
        rows.append(("HH-RLHF harmless cost", len(tr), len(te), res.metrics["test"]["pairwise_accuracy"],
                     None, "-"))
    print(f"\nbackbone {args.backbone} ({args.pooling} pooling), max_length {args.max_length}, "
          f"{time.perf_counter() - t0:.0f}s in all")
    print(f"{'set':<24} {'train':>6} {'test':>5} {'pairwise acc':>13} {'sign acc':>9}   {args.folds}-fold CV")
    for name, ntr, nte, acc, sign, cv in rows:
        s = f"{sign:.3f}" if sign is not None else "-"
        print(f"{name:<24} {ntr:>6} {nte:>5} {acc:>13.3f} {s:>9}   {cv}")
    print("reference: beaver-7b reward/cost models, ~0.7 pairwise accuracy on PKU-SafeRLHF")
    return 0


if __name__ == "__main__":
    sys.exit(main())
