"""What the machine can do, for the benches' utilization figures: the measured fp32 matmul peak
and the FLOPs a piece of work really executes.

    python bench/roofline.py            # prints the peak at 1 and at all torch threads

Utilization (MFU in the benches) = executed matmul/attention FLOPs ÷ wall time ÷ this peak.
The peak is measured, not taken from a datasheet: a square fp32 matmul large enough to be
compute-bound (2048², about 17 GFLOP), repeated for `seconds`. On the 2-core CI machine it
measured about 145 GFLOP/s with 2 threads (74 per core, AVX2, no AVX-512); other machines
differ, which is why every bench measures it in its own process.
"""
from __future__ import annotations

import time


def matmul_peak_gflops(seconds: float = 1.0, n: int = 2048) -> float:
    """Sustained fp32 matmul rate (GFLOP/s) of an n×n by n×n product at the current torch
    thread count, after one untimed warm-up product."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def linear_flops_per_token(model) -> int:
    """FLOPs one token costs in a forward pass through every `nn.Linear` of `model` (2 per
    weight; the output head once even when tied to the embedding). Attention over the
    context adds 4 · layers · context · hidden, small next to this at our lengths, so a
    decoding ceiling of peak ÷ this is an upper bound."""
    import torch

    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel()
    return 2 * total


def executed_flops(fn) -> tuple[object, int]:
    """(fn(), FLOPs of the matmuls and attention it ran), counted by torch's FlopCounterMode
    (forward and backward; elementwise work is not counted). Counting slows `fn` down, so
    the benches count in a separate, untimed run of the same work."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, int(counter.get_total_flops())


if __name__ == "__main__":
    import torch

    threads = torch.get_num_threads()
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        print(f"fp32 matmul peak, {t} thread(s): {matmul_peak_gflops():.0f} GFLOP/s")
