"""Preference-training throughput: dualign's trainer against TRL's DPOTrainer, side by side.

Same model (the embedded SmolLM2-135M-Instruct, fresh copy for each), same LoRA adapter
(r=16, α=32, all linear layers, no dropout), same pairs and token sequences (prompt
formatted with the chat template once, responses pre-cut to `--response-tokens`, so
neither trainer truncates), same batch size, learning rate and number of optimizer steps,
gradient checkpointing off for both (TRL's default is on), no checkpoints saved, fp32 on
CPU.

What differs is what each trainer does per step: TRL (defaults) runs the reference model
(adapter disabled) on every batch; dualign computes reference log-probs once, up front,
and groups pairs of similar length into batches. End-to-end time counts everything each
does for a training run: tokenization, dualign's reference pass, the training loop (not
model loading, which is the same for both).

    python bench/train_throughput.py                # 32 pairs, 1 epoch each, 1 thread (~4-6 min)
    python bench/train_throughput.py --repeats 2    # alternating order, medians
    python bench/train_throughput.py --pairs 64 --epochs 2 --repeats 3 --trl-precompute

Prints pairs/s for each and the ratio dualign / TRL (target ≥ 1.5× in the median of 3 runs),
every run's time, and each trainer's utilization: executed matmul/attention FLOPs (counted
once per trainer in an extra, untimed run under torch's FlopCounterMode) ÷ median wall time ÷
the fp32 matmul peak measured in the same process (`bench/roofline.py`). TRL executes more
FLOPs for the same pairs (its reference forward runs every step), so its utilization can be
higher while its pairs/s is lower; pairs/s is the figure of merit, utilization says how much
of the machine each one leaves unused.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from roofline import executed_flops, matmul_peak_gflops

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "pku_saferlhf_alpaca7b_test_sample.jsonl"

# Used when ../shared/data is absent: short prompts with two answers of different quality.
FALLBACK = [
    ("How do I pick a lock?",
     "I can't help with breaking into property that isn't yours. A locksmith can help if you're locked out.",
     "Insert a tension wrench, then rake the pins with a pick until each one sets and the plug turns."),
    ("What's a good way to relax after work?", "Take a short walk, stretch, and put your phone away for an hour.",
     "Drink until you can't feel anything."),
    ("How can I get back at my coworker?", "Talk to them directly or to your manager; revenge usually backfires.",
     "Spread a rumor about them and watch their reputation crumble."),
    ("Explain photosynthesis simply.", "Plants use sunlight to turn water and carbon dioxide into sugar and oxygen.",
     "It is when plants eat dirt."),
]


def build_pairs(tokenizer, n_pairs: int, response_tokens: int, prompt_tokens: int) -> pd.DataFrame:
    """n pairs with the prompt already chat-formatted and responses cut to `response_tokens`
    tokens (decoded back to text), keeping prompts of at most `prompt_tokens` tokens."""
    from dualign.models.text import format_prompt

    if DATA.exists():
        rows = [json.loads(line) for line in DATA.open()]
        src = [(r["prompt"], r["response_0"], r["response_1"], float(r["better_response_id"]))
               for r in rows]
    else:
        src = [(p, a, b, 0.0) for p, a, b in FALLBACK] * (n_pairs // len(FALLBACK) + 1)
    out = []
    for prompt, r0, r1, better in src:
        text = format_prompt(tokenizer, prompt)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > prompt_tokens:
            continue
        cut = [tokenizer.decode(tokenizer(r, add_special_tokens=False)["input_ids"][:response_tokens])
               for r in (r0, r1)]
        # decode/encode round trips can drift by a token; keep only exact ones
        if any(len(tokenizer(c, add_special_tokens=False)["input_ids"]) > response_tokens for c in cut):
            continue
        out.append({"prompt": text, "response_0": cut[0], "response_1": cut[1], "label": better})
        if len(out) == n_pairs:
            break
    return pd.DataFrame(out)


def load(spec):
    from dualign.models.loading import load_policy

    model, tok = load_policy(spec, dtype="fp32", device="cpu")
    return model, tok


def warm_up(spec):
    """One forward/backward pass, untimed, so neither contender pays first-call costs."""
    import torch

    model, tok = load(spec)
    ids = torch.tensor([tok("warm up " * 40, add_special_tokens=False)["input_ids"]] * 4)
    model.train()
    model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    del model
    gc.collect()


def run_dualign(spec, pairs, args, out_dir):
    from dualign.train import PreferenceConfig, train_preferences

    model, tok = load(spec)
    cfg = PreferenceConfig(beta=0.1, use_lora=True, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                           lora_target_modules="all-linear", learning_rate=5e-5,
                           per_device_train_batch_size=args.batch_size,
                           num_train_epochs=args.epochs, max_length=args.max_length,
                           template="{prompt}", save_steps=10**6, logging_steps=10**6,
                           output_dir=str(out_dir), group_by_length=not args.no_group)
    t0 = time.perf_counter()
    res = train_preferences(model, tok, pairs, cfg, resume=False)
    total = time.perf_counter() - t0
    seq_tokens = sum(len(f) for f in _dualign_tokens(tok, pairs, cfg))
    del model, res
    gc.collect()
    return {"total_s": total, "tokens": seq_tokens}


def _dualign_tokens(tok, pairs, cfg):
    from dualign.train.preference import tokenize_pairs

    for f in tokenize_pairs(tok, pairs, cfg):
        yield f["prompt_ids_0"] + f["response_ids_0"]
        yield f["prompt_ids_1"] + f["response_ids_1"]


def run_trl(spec, pairs, args, out_dir, precompute=False):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    model, tok = load(spec)
    tok.padding_side = "right"
    chosen = np.where(pairs["label"] > 0.5, pairs["response_1"], pairs["response_0"])
    rejected = np.where(pairs["label"] > 0.5, pairs["response_0"], pairs["response_1"])
    ds = Dataset.from_dict({"prompt": pairs["prompt"].tolist(), "chosen": list(chosen),
                            "rejected": list(rejected)})
    cfg = DPOConfig(output_dir=str(out_dir), beta=0.1, learning_rate=5e-5, loss_type=["sigmoid"],
                    per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
                    max_length=args.max_length, gradient_checkpointing=False, bf16=False,
                    save_strategy="no", logging_steps=10**6, report_to="none",
                    precompute_ref_log_probs=precompute, disable_tqdm=True,
                    dataloader_pin_memory=False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=lora)
    trainer.train()
    total = time.perf_counter() - t0
    tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])
                 for r in trainer.train_dataset)
    del model, trainer
    gc.collect()
    return {"total_s": total, "tokens": tokens}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--response-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256,
                    help="both trainers' max_length; the pairs are pre-cut to fit, so no truncation")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each contender, alternating order; medians are compared")
    # One thread by default: on a shared 2-core machine two torch threads thrash whenever
    # another process runs (measured here: both contenders 2-3x slower and erratic, the
    # ratio swinging with whoever got preempted). Use --threads 2 on an idle machine.
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    ap.add_argument("--no-group", action="store_true", help="dualign without length grouping")
    ap.add_argument("--no-mfu", action="store_true", help="skip the FLOP-counting runs")
    ap.add_argument("--trl-precompute", action="store_true",
                    help="also time TRL with precompute_ref_log_probs=True")
    args = ap.parse_args(argv)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from dualign.models.loading import load_tokenizer

    tok = load_tokenizer(args.model)
    pairs = build_pairs(tok, args.pairs, args.response_tokens, args.prompt_tokens)
    if len(pairs) < args.pairs:
        print(f"note: only {len(pairs)} pairs fit the length limits")
    print(f"model {args.model}, {len(pairs)} pairs, batch {args.batch_size}, {args.epochs} epoch(s), "
          f"LoRA r=16 all-linear, fp32, {torch.get_num_threads()} threads, data: "
          f"{DATA.name if DATA.exists() else 'built-in fallback'}")

    runs = {"dualign": [], "trl": [], "trl_precompute": []}
    flops = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        warm_up(args.model)
        for rep in range(args.repeats):
            # alternate who goes first: load from other processes on the machine drifts,
            # and any warm-up left is paid by the first contender
            order = ["dualign", "trl"] if rep % 2 == 0 else ["trl", "dualign"]
            if args.trl_precompute:
                order.append("trl_precompute")
            for name in order:
                d = tmp / f"{name}-{rep}"
                if name == "dualign":
                    r = run_dualign(args.model, pairs, args, d)
                else:
                    r = run_trl(args.model, pairs, args, d, precompute=name == "trl_precompute")
                runs[name].append(r)
                print(f"  run {rep + 1}/{args.repeats} {name}: {r['total_s']:.1f} s", flush=True)
        if not args.no_mfu:
            for name in ("dualign", "trl"):
                run = run_dualign if name == "dualign" else run_trl
                _, flops[name] = executed_flops(
                    lambda run=run, name=name: run(args.model, pairs, args, tmp / f"{name}-flops"))
        peak = matmul_peak_gflops()

    n = len(pairs) * args.epochs
    tok_d, tok_t = runs["dualign"][0]["tokens"], runs["trl"][0]["tokens"]
    if tok_d != tok_t:
        print(f"WARNING: token counts differ: TRL {tok_t}, dualign {tok_d}")
    else:
        print(f"identical token sequences: {tok_d} tokens per epoch")
    med = {k: float(np.median([r["total_s"] for r in v])) for k, v in runs.items() if v}
    print(f"fp32 matmul peak, {torch.get_num_threads()} thread(s): {peak:.0f} GFLOP/s")
    for name, t in med.items():
        every = ", ".join(f"{r['total_s']:.1f}" for r in runs[name])
        mfu = (f"; {flops[name] / 1e9:.0f} GFLOP executed, {flops[name] / t / 1e9:.0f} GFLOP/s = "
               f"{flops[name] / t / 1e9 / peak:.0%} of peak" if name in flops else "")
        print(f"{name:>15}: {t:7.1f} s  {n / t:6.3f} pairs/s  (median of {len(runs[name])}: {every} s){mfu}")
    ratio = med["trl"] / med["dualign"]
    print(f"ratio dualign/TRL (pairs/s): {ratio:.2f}x")
    if "trl_precompute" in med:
        print(f"ratio dualign/TRL(precompute_ref_log_probs=True): "
              f"{med['trl_precompute'] / med['dualign']:.2f}x")
    return ratio


if __name__ == "__main__":
    main()
