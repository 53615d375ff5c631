"""Benchmark: batched sampling (dualign.models.generation) against one prompt at a time with
`model.generate`, side by side in one process on the embedded SmolLM2-135M-Instruct.

    .venv/bin/python bench/sampling.py [--n-prompts 8] [--max-new-tokens 32] [--batch-size 8]

(1) Greedy decoding both ways: the token sequences must be identical (batching and left
    padding change nothing); tokens/s of each and the ratio (target >= 3x).
(2) Sampling (temperature 1, top-p 0.9) with dualign's per-row streams at batch size B and
    at batch size 1: identical responses (a row's sample does not depend on its batch),
    and the tokens/s ratio.
(3) The roofline: the batched sampling rate against the ceiling the measured fp32 matmul peak
    allows (`bench/roofline.py`: peak ÷ the model's linear-layer FLOPs per token), and the
    ratio (target ≥ 50%).
Tokens counted are the generated tokens up to and including the stop token.

    .venv/bin/python bench/sampling.py --demo-stage [--num-samples 4] [--repeats 3] [--variants before,now]

runs instead the demo's sample stage shape (the 106 train prompts of dualign/data/demo/prompts.jsonl
x K, 48 new tokens, temperature 1, top-p 0.9) in the ways `--variants` names (`VARIANTS`:
"dynamic", transformers' cache grown by concatenation, batches of 128, every prompt run whole,
finished rows dropped at once; "before", the same with the preallocated cache (the sampler and
demo setting before prefix sharing); "shared", "before" with the prompts' common prefix run once;
"now", today's default and demo setting: the common prefix once, finished rows dropped once they
are 1/8 of the batch, one batch of 424 rows), alternately in one process, `--repeats` times each:
tokens/s, the roofline ratio of every run, their mean and spread, each variant's ratio to the
first, and how many rows gave the first variant's tokens.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dualign.models.generation import _stop_ids, generate_batch, plan_batches, row_uniforms, sample
from dualign.models.loading import EMBEDDED_DEFAULT, load_policy
from dualign.models.text import encode_prompt
from roofline import linear_flops_per_token, matmul_peak_gflops

PROMPTS = [
    "Write a short poem about the sea.", "Explain photosynthesis to a child.",
    "List three uses of baking soda.", "What causes the seasons on Earth?",
    "Give me a recipe for pancakes.", "How do vaccines work?",
    "Describe the water cycle.", "What is a black hole?",
    "Why is the sky blue?", "How can I improve my handwriting?",
    "Tell me a story about a brave mouse.", "What are the benefits of exercise?",
    "How does a bicycle stay upright?", "Summarize the plot of Romeo and Juliet.",
    "What is machine learning?", "Give tips for learning a new language.",
]


def one_at_a_time(model, tok, enc, max_new_tokens, stops):
    """The baseline: `model.generate` on each prompt alone, greedy."""
    out = []
    for ids in enc:
        g = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id, eos_token_id=stops)[0, len(ids):].tolist()
        cut = next((i + 1 for i, t in enumerate(g) if t in stops), len(g))
        out.append(g[:cut])
    return out


def batched_greedy(model, tok, enc, max_new_tokens, batch_size):
    out = [None] * len(enc)
    for rows in plan_batches([len(e) for e in enc], 1, batch_size):
        res = generate_batch(model, tok, [enc[p] for p, _ in rows], max_new_tokens=max_new_tokens,
                             temperature=0)
        for (p, _), (toks, _) in zip(rows, res):
            out[p] = toks
    return out


def timed(f):
    t = time.perf_counter()
    r = f()
    return r, time.perf_counter() - t


AT_ONCE = 10 ** 9  # compact_at: finished rows leave the batch at the step they finish
# name: (batch size, generate_batch settings)
VARIANTS = {"dynamic": (128, dict(cache="dynamic", share_prefix=False, compact_at=AT_ONCE)),
            "before": (128, dict(cache="buffer", share_prefix=False, compact_at=AT_ONCE)),
            "shared": (128, dict(cache="buffer", share_prefix=True, compact_at=AT_ONCE)),
            "now": (512, dict(cache="buffer", share_prefix=True))}


def demo_stage(model, tok, num_samples, repeats, variants=("before", "now"), n_prompts=None, max_new_tokens=48):
    """The demo's sample stage (train prompts x K, seeds) once per variant per repeat,
    alternating their order so a change in machine load hits all alike."""
    import pandas as pd

    from dualign.data.demo_data import demo_path

    q = pd.read_json(demo_path("prompts"), lines=True)
    enc = [encode_prompt(tok, p) for p in q[q["split"] == "train"]["prompt"]][:n_prompts]

    def stage(variant):
        batch_size, settings = VARIANTS[variant]
        rows_out = {}
        for rows in plan_batches([len(e) for e in enc], num_samples, batch_size):
            res = generate_batch(model, tok, [enc[p] for p, _ in rows], max_new_tokens=max_new_tokens,
                                 temperature=1.0, top_p=0.9, uniforms=row_uniforms(0, rows, max_new_tokens),
                                 **settings)
            rows_out.update(zip(rows, res))
        return [rows_out[k] for k in sorted(rows_out)]  # by (prompt, sample), whatever the batches

    peak, per_token = matmul_peak_gflops(), linear_flops_per_token(model)
    ceiling = peak * 1e9 / per_token
    plans = "; ".join(f"{v}: batches of <= {VARIANTS[v][0]}, {VARIANTS[v][1]}" for v in variants)
    print(f"demo sample stage: {len(enc)} prompts x K={num_samples} = {len(enc) * num_samples} rows, "
          f"{max_new_tokens} new tokens; {plans}; {torch.get_num_threads()} threads; fp32 matmul peak "
          f"{peak:.0f} GFLOP/s, {per_token / 1e9:.3f} GFLOP/token -> ceiling {ceiling:.0f} tok/s")
    generate_batch(model, tok, [enc[0]] * 4, max_new_tokens=4, temperature=0)  # warm-up
    rates, outs = {v: [] for v in variants}, {}
    for r in range(repeats):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            load = os.getloadavg()[0]
            res, dt = timed(lambda v=v: stage(v))
            n = sum(len(t) for t, _ in res)
            rates[v].append(n / dt)
            outs.setdefault(v, res)
            print(f"run {r + 1} {v:7s}: {n} tokens in {dt:6.1f}s = {n / dt:6.1f} tok/s = "
                  f"{n / dt / ceiling:.1%} of the ceiling (load average before the run {load:.2f})", flush=True)
    # the ratio's denominator is the machine's peak: measured again at the end, the higher of
    # the two (another job running during one measurement lowers it and would flatter the ratio)
    peak2 = matmul_peak_gflops()
    if peak2 > peak:
        ceiling = peak2 * 1e9 / per_token
        print(f"fp32 matmul peak measured again: {peak2:.0f} GFLOP/s (ceiling {ceiling:.0f} tok/s); "
              f"the summary below uses it")
    first = variants[0]
    for v, x in rates.items():
        print(f"{v:7s}: {statistics.mean(x):6.1f} tok/s (min {min(x):.1f}, max {max(x):.1f}) = "
              f"{statistics.mean(x) / ceiling:.1%} of the ceiling (min {min(x) / ceiling:.1%}, "
              f"max {max(x) / ceiling:.1%})")
        if v != first:
            same = sum(a == b for a, b in zip(outs[first], outs[v]))
            print(f"RATIO {v}/{first} tokens/s: {statistics.mean(x) / statistics.mean(rates[first]):.2f}x; "
                  f"rows with {first}'s tokens: {same}/{len(enc) * num_samples}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=EMBEDDED_DEFAULT)
    ap.add_argument("--n-prompts", type=int, default=None,
                    help="default 8 (--demo-stage: all 106 train prompts; fewer: the first n)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (--demo-stage: each variant's own)")
    ap.add_argument("--num-samples", type=int, default=None,
                    help="K for the sampling comparison; default 2 (--demo-stage: 4, the demo's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--demo-stage", action="store_true",
                    help="time the demo's sample stage shape, the ways --variants names, instead")
    ap.add_argument("--repeats", type=int, default=3, help="--demo-stage: runs per variant")
    ap.add_argument("--variants", default="before,now",
                    help=f"--demo-stage: comma-separated, of {', '.join(VARIANTS)}; ratios are to the first")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    model, tok = load_policy(a.model)
    if a.demo_stage:
        return demo_stage(model, tok, a.num_samples or 4, a.repeats, tuple(a.variants.split(",")), a.n_prompts)
    a.num_samples, a.batch_size, a.n_prompts = a.num_samples or 2, a.batch_size or 8, a.n_prompts or 8
    prompts = (PROMPTS * (a.n_prompts // len(PROMPTS) + 1))[:a.n_prompts]
    prompts = [p if i < len(PROMPTS) else f"{p} (variant {i})" for i, p in enumerate(prompts)]
    enc = [encode_prompt(tok, p) for p in prompts]
    stops = _stop_ids(model, tok)
    print(f"model {a.model} on {next(model.parameters()).device}, {torch.get_num_threads()} threads; "
          f"{len(prompts)} prompts, max_new_tokens {a.max_new_tokens}, batch size {a.batch_size}; "
          f"load average {os.getloadavg()[0]:.1f}")

    batched_greedy(model, tok, enc[:2], 4, 2)  # warm-up (first-call allocations)
    ref, t_ref = timed(lambda: one_at_a_time(model, tok, enc, a.max_new_tokens, stops))
    bat, t_bat = timed(lambda: batched_greedy(model, tok, enc, a.max_new_tokens, a.batch_size))
    n_ref, n_bat = sum(map(len, ref)), sum(map(len, bat))
    same = sum(r == b for r, b in zip(ref, bat))
    print(f"greedy, one at a time (model.generate): {n_ref} tokens in {t_ref:.1f}s = {n_ref / t_ref:.1f} tok/s")
    print(f"greedy, batched:                        {n_bat} tokens in {t_bat:.1f}s = {n_bat / t_bat:.1f} tok/s")
    print(f"greedy outputs identical: {same}/{len(ref)}")
    print(f"RATIO greedy batched/one-at-a-time tokens/s: {(n_bat / t_bat) / (n_ref / t_ref):.2f}x (target >= 3x)")

    kw = dict(num_samples=a.num_samples, max_new_tokens=a.max_new_tokens, temperature=1.0, top_p=0.9,
              seed=0, progress=False)
    s1, t1 = timed(lambda: sample(model, tok, prompts[: max(1, a.n_prompts // 2)], batch_size=1, **kw))
    sb, tb = timed(lambda: sample(model, tok, prompts[: max(1, a.n_prompts // 2)], batch_size=a.batch_size, **kw))
    same_s = int((s1["response"] == sb["response"]).sum())
    n1, nb = int(s1["n_tokens"].sum()), int(sb["n_tokens"].sum())
    print(f"sampling, batch 1: {n1} tokens in {t1:.1f}s = {n1 / t1:.1f} tok/s; "
          f"batch {a.batch_size}: {nb} tokens in {tb:.1f}s = {nb / tb:.1f} tok/s")
    print(f"sampled responses identical across batch sizes: {same_s}/{len(s1)}")
    print(f"RATIO sampling batched/batch-1 tokens/s: {(nb / tb) / (n1 / t1):.2f}x")
    peak, per_token = matmul_peak_gflops(), linear_flops_per_token(model)
    ceiling = peak * 1e9 / per_token
    print(f"ROOFLINE: fp32 matmul peak {peak:.0f} GFLOP/s, {per_token / 1e9:.3f} GFLOP per token -> "
          f"ceiling {ceiling:.0f} tok/s; batched sampling {nb / tb:.0f} tok/s = {nb / tb / ceiling:.0%} of it")


if __name__ == "__main__":
    main()
