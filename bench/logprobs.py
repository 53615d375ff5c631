"""Benchmark: batched sequence log-probs (dualign.models.logprobs) against a per-example loop,
side by side in one process on the embedded SmolLM2-135M-Instruct.

    .venv/bin/python bench/logprobs.py [--n 32] [--batch-size 16] [--repeat 1]

The per-example loop is the plain way: for each pair, one unpadded forward pass over
prompt+response and the same `response_logps` reduction over its full logits. Prints
tokens/s (prompt+response tokens) of each and the ratio (target >= 2x).

Where the gain comes from: fewer, larger matmuls (less per-call and thread-sync overhead) and
no logits for prompt positions. On a compute-bound CPU with one thread, one ~100-token
forward already fills the matmul units and batching gains little (measured 1.03x with
--threads 1 under load, ~1.15-1.3x at batch sizes 4-8); the ratio grows with threads, load
and on GPUs.

Agreement is checked twice. In fp32 (the timed runs) the two differ by float rounding only:
the backbone's matmuls round differently for a batch of 1 and a batch of B (even B identical
unpadded rows differ by ~1e-4 in the logits of a 135M model), which sums to ~1e-4 nats over a
100-token response. The logic (padding, masking, positions, truncated logits) is checked
in float64 on the first --check-n pairs, where it must agree within 1e-4 (the remaining
~1e-5 comes from `response_logps`, which reduces in float32).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from dualign.models.loading import EMBEDDED_DEFAULT, load_policy
from dualign.models.logprobs import logprobs
from dualign.models.text import encode_pairs, response_logps
from roofline import executed_flops, matmul_peak_gflops

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Water boils at one hundred degrees Celsius at sea level.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "I'm sorry, but I can't help with that request.", "Here is a simple recipe you can try at home.",
    "First, preheat the oven to 180 degrees.", "Regular exercise improves sleep and mood.",
    "The capital of France is Paris.", "Vaccines train the immune system to recognize a pathogen.",
    "Let me explain this step by step.", "Black holes are regions where gravity is so strong that nothing escapes.",
    "Always wear a helmet when riding a bicycle.",
]
PROMPTS = ["How do I bake bread?", "Explain gravity.", "What should I eat for breakfast?",
           "Is it safe to swim after eating?", "Tell me about the history of Rome in a few sentences.",
           "Why do cats purr?", "hi", "Write a haiku about rain."]


def make_pairs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    responses = [" ".join(rng.choice(SENTENCES, size=int(rng.integers(1, 9)))) for _ in range(n)]
    return prompts, responses


def per_example(model, tok, prompts, responses):
    """The baseline: one unpadded forward pass per pair over all positions."""
    out = []
    with torch.no_grad():
        for p_ids, r_ids in encode_pairs(tok, prompts, responses):
            ids = torch.tensor([p_ids + r_ids], device=model.device)
            mask = torch.zeros_like(ids)
            mask[0, len(p_ids):] = 1
            out.append(float(response_logps(model(input_ids=ids).logits, ids, mask)[0]))
    return np.array(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=EMBEDDED_DEFAULT)
    ap.add_argument("--n", type=int, default=32, help="(prompt, response) pairs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1, help="timed repetitions (best is kept)")
    ap.add_argument("--check-n", type=int, default=8, help="pairs checked in float64 (0: skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    model, tok = load_policy(a.model)
    prompts, responses = make_pairs(a.n)
    n_tok = sum(len(p) + len(r) for p, r in encode_pairs(tok, prompts, responses))
    print(f"model {a.model} on {next(model.parameters()).device}, {torch.get_num_threads()} threads; "
          f"{a.n} pairs, {n_tok} tokens, batch size {a.batch_size}; load average {os.getloadavg()[0]:.1f}")
    per_example(model, tok, prompts[:2], responses[:2])  # warm-up
    t_ref, t_bat = float("inf"), float("inf")
    for _ in range(a.repeat):
        t = time.perf_counter()
        ref = per_example(model, tok, prompts, responses)
        t_ref = min(t_ref, time.perf_counter() - t)
        t = time.perf_counter()
        bat, _ = logprobs(model, tok, prompts, responses, batch_size=a.batch_size)
        t_bat = min(t_bat, time.perf_counter() - t)
    err = float(np.abs(ref - bat).max())
    print(f"per-example loop: {t_ref:.2f}s = {n_tok / t_ref:.0f} tok/s")
    print(f"batched:          {t_bat:.2f}s = {n_tok / t_bat:.0f} tok/s")
    print(f"fp32: max |batched - per-example| = {err:.2e} nats (float rounding of batch-shaped matmuls; "
          f"mean |diff| {np.abs(ref - bat).mean():.1e})")
    if a.check_n:
        m64 = model.to(torch.float64)
        k = min(a.check_n, a.n)
        r64 = per_example(m64, tok, prompts[:k], responses[:k])
        b64, _ = logprobs(m64, tok, prompts[:k], responses[:k], batch_size=a.batch_size)
        e64 = float(np.abs(r64 - b64).max())
        print(f"fp64 ({k} pairs): max |batched - per-example| = {e64:.2e} nats "
              f"({'OK' if e64 <= 1e-4 else 'MISMATCH'}, tolerance 1e-4)")
    print(f"RATIO batched/per-example tokens/s: {t_ref / t_bat:.2f}x (target >= 2x)")
    # the roofline of a forward-only pass: the matmul FLOPs the batched call executes (counted in
    # an untimed run of the same work) per second of its timed run, against the measured peak
    if a.check_n:
        model = model.to(torch.float32)
    _, flops = executed_flops(lambda: logprobs(model, tok, prompts, responses, batch_size=a.batch_size))
    peak = matmul_peak_gflops()
    print(f"ROOFLINE batched: {flops / t_bat / 1e9:.0f} GFLOP/s executed, {100 * flops / t_bat / 1e9 / peak:.0f}% "
          f"of the measured fp32 matmul peak {peak:.0f} GFLOP/s (target >= 50%)")


if __name__ == "__main__":
    main()
