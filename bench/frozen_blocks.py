"""Training with the frozen blocks run once (`PreferenceConfig.cache_frozen_blocks`) against the
full forward every step, side by side in one process on the embedded SmolLM2-135M-Instruct.

The demo's training settings (LoRA r=16 on the last 10 of 30 blocks, batch 4, lr 3e-4,
`sft_weight` 1, answer prefixes of `--response-tokens`), the first `--pairs` built-in demo
pairs labeled by their `better_response_id`, `--epochs` epochs. Time counts the whole
`train_preferences` call: tokenization, the reference pass (which also records the frozen
blocks' output when the cache is on) and the training loop; not model loading.

    python bench/frozen_blocks.py                       # 96 pairs, 1 epoch, 16-token prefixes
    python bench/frozen_blocks.py --epochs 3 --response-tokens 40 --repeats 2

Prints s/pair of each (per repeat, alternating order), the ratio, and the largest difference
in the final training loss (same model up to float rounding).

    python bench/frozen_blocks.py --mfu --pairs 64 --response-tokens 40

instead measures the demo's training step (frozen blocks cached) on its own: one run of 1 epoch
and one of 3, timed, and each again under torch's FlopCounterMode; their difference is two
epochs of steps without the reference pass. Prints s/step, executed GFLOP/step and the share of
the fp32 matmul peak measured in the same process (`bench/roofline.py`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualign.data.demo_data import demo_path  # noqa: E402
from dualign.data.preferences import load_preferences  # noqa: E402
from dualign.models.loading import EMBEDDED_DEFAULT, load_policy  # noqa: E402
from dualign.train import PreferenceConfig, train_preferences  # noqa: E402
from roofline import executed_flops, matmul_peak_gflops  # noqa: E402


def demo_pairs(n: int) -> pd.DataFrame:
    prefs = load_preferences(demo_path("train"), limit=n)
    return prefs[["prompt", "response_0", "response_1"]].assign(
        label=np.where(prefs["better_response_id"] == 1, 0.95, 0.05))


def demo_training(pairs, args, *, epochs: float, cached: bool):
    """A fresh embedded model and the demo's training settings: a call that trains it on `pairs`."""
    model, tok = load_policy(EMBEDDED_DEFAULT)
    cfg = PreferenceConfig(per_device_train_batch_size=4, learning_rate=3e-4, sft_weight=1.0,
                           num_train_epochs=epochs, max_length=192, max_response_length=args.response_tokens,
                           lora_last_layers=10, cache_frozen_blocks=cached, save_steps=100_000,
                           logging_steps=100_000, output_dir=tempfile.mkdtemp(prefix="bench-frozen-"))
    return lambda: train_preferences(model, tok, pairs, cfg, resume=False)


def one_run(pairs, args, cached: bool) -> tuple[float, float]:
    train = demo_training(pairs, args, epochs=args.epochs, cached=cached)
    t0 = time.perf_counter()
    res = train()
    return (time.perf_counter() - t0) / len(pairs), res.train_loss


def step_utilization(pairs, args) -> None:
    """The demo's training step: time and executed FLOPs of 3 epochs minus 1 epoch."""
    seconds, flops = {}, {}
    for epochs in (1, 3):
        train = demo_training(pairs, args, epochs=epochs, cached=True)
        t0 = time.perf_counter()
        train()
        seconds[epochs] = time.perf_counter() - t0
        # a separate, untimed run: counting is slow
        flops[epochs] = executed_flops(demo_training(pairs, args, epochs=epochs, cached=True))[1]
        print(f"{epochs} epoch(s) incl. the reference pass: {seconds[epochs]:.1f} s, "
              f"{flops[epochs] / 1e12:.2f} TFLOP", flush=True)
    peak = matmul_peak_gflops()
    steps = 2 * -(-len(pairs) // 4)
    dt, fl = seconds[3] - seconds[1], flops[3] - flops[1]
    print(f"\ndemo training step ({len(pairs)} pairs, batch 4, {args.response_tokens}-token prefixes): "
          f"{dt / steps:.2f} s/step, {fl / steps / 1e9:.1f} GFLOP/step executed, {fl / dt / 1e9:.0f} GFLOP/s "
          f"= {fl / dt / 1e9 / peak:.0%} of the fp32 matmul peak ({peak:.0f} GFLOP/s, measured now)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--response-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--mfu", action="store_true", help="the demo step's time and FLOP utilization instead")
    args = ap.parse_args(argv)
    pairs = demo_pairs(args.pairs)
    if args.mfu:
        return step_utilization(pairs, args)
    times = {False: [], True: []}
    losses = {False: [], True: []}
    for r in range(args.repeats):
        for cached in ((False, True) if r % 2 == 0 else (True, False)):
            t, loss = one_run(pairs, args, cached)
            times[cached].append(t)
            losses[cached].append(loss)
            print(f"repeat {r + 1}: {'frozen blocks cached' if cached else 'full forward       '} "
                  f"{t:.3f} s/pair (loss {loss:.4f})", flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"\n{len(pairs)} pairs × {args.epochs:g} epoch(s), {args.response_tokens}-token prefixes: "
          f"full forward {med[False]:.3f} s/pair, cached {med[True]:.3f} s/pair; "
          f"ratio {med[False] / med[True]:.2f}×; final loss differs by at most "
          f"{max(abs(a - b) for a, b in zip(losses[False], losses[True])):.2e}")


if __name__ == "__main__":
    main()
