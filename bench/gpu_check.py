"""GPU readiness check (issue 12): the heavy stages' speed on one GPU, in one short run.

    bash bench/gpu_check.sh                      # on a GPU machine (≤ 10 min, nothing downloaded)
    .venv/bin/python bench/gpu_check.py --smoke  # here, on the CPU: the same code at toy size

A GPU window is short and such machines are often offline, so nothing is downloaded: the
models are random-weight Llamas of real shapes (`SHAPES`) built in place, in bf16, with a
byte-level tokenizer padded to the model's vocabulary. Random weights change what is said,
not what it costs: every row decodes `--max-new-tokens` tokens (a random model almost never
draws its stop token; the count of generated tokens is measured, not assumed).

For each shape it prints:
  1. sampling with dualign's HF backend (`dualign.models.generation.sample`): tokens/s;
  2. sampling with vLLM (`sample_vllm`) when vllm is installed: tokens/s and the ratio;
  3. one-shot training (`train_preferences`, LoRA, bf16) on synthetic pairs: s/step,
     trained tokens/s and MFU against the measured bf16 matmul peak (FLOPs counted by
     torch's FlopCounterMode in a separate untimed step);
  4. scoring (`pooled_features`, forward only): tokens/s and the same utilization.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

# name -> (hidden, layers, heads, kv heads, intermediate, vocab): published architectures' shapes
SHAPES = {
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256),
    "llama-2-7b": (4096, 32, 32, 32, 11008, 32000),
    "toy": (64, 2, 4, 2, 128, 512),  # --smoke
}
PROMPT = "Question {i}: how does a bicycle stay upright when it moves, and why does it fall when it stops?"


def byte_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer (no merges) whose vocabulary is padded with extra tokens to
    `vocab_size`, so that every id a model of that vocabulary draws decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<s>", "</s>", "<unk>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(base + [f"<x{i}>" for i in range(vocab_size - len(base))])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def build_model(shape: str, out: Path, device: str, dtype) -> tuple[object, object, float]:
    """A random-weight Llama of `shape` saved to `out` (safetensors, for vLLM), loaded on
    `device`; returns (model, tokenizer, parameters in billions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=shape == "smollm2-135m",
                      torch_dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    tok = byte_tokenizer(vocab)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model, tok, sum(p.numel() for p in model.parameters()) / 1e9


def matmul_peak_tflops(device: str, dtype, n: int, seconds: float = 1.0) -> float:
    """Sustained n×n matmul rate (TFLOP/s) in `dtype` on `device`, after a warm-up product."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def counted_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def check_sampling(model, tok, model_dir: Path, prompts, args, device: str) -> dict:
    from dualign.models.generation import sample, sample_vllm

    settings = dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=0.9,
                    seed=0, template="User: {prompt}\nAssistant:")
    sample(model, tok, prompts[:2], **{**settings, "max_new_tokens": 4}, batch_size=8, progress=False)  # warm-up
    df, sec = timed(lambda: sample(model, tok, prompts, **settings, batch_size=args.sample_batch_size,
                                   progress=False), device)
    out = {"hf_tokens_per_s": int(df["n_tokens"].sum()) / sec, "hf_seconds": sec, "rows": len(df)}
    try:
        import vllm  # noqa: F401
    except ImportError:
        out["vllm"] = "not installed"
        return out
    if not device.startswith("cuda"):
        out["vllm"] = "skipped (no GPU)"
        return out
    try:  # vLLM brings its own engine up: time its generation, not its start-up
        vdf, vsec = timed(lambda: sample_vllm(str(model_dir), prompts, **settings, dtype="bfloat16"), device)
        out.update(vllm_tokens_per_s=int(vdf["n_tokens"].sum()) / vsec, vllm_seconds_incl_startup=vsec)
    except Exception as e:  # report and go on: the rest of the window is worth more
        out["vllm"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    return out


def check_training(model, tok, args, device: str, peak_tflops: float, work: Path) -> dict:
    from dualign.train.preference import PreferenceConfig, train_preferences

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(200)]
    say = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    n = args.train_pairs
    pairs = pd.DataFrame({"prompt": [say(args.prompt_words) for _ in range(n)],
                          "response_0": [say(args.response_words) for _ in range(n)],
                          "response_1": [say(args.response_words) for _ in range(n)],
                          "label": rng.uniform(size=n)})
    cfg = dict(output_dir=str(work / "train"), per_device_train_batch_size=args.train_batch_size,
               max_steps=args.train_steps, learning_rate=1e-4, bf16=device.startswith("cuda"), use_lora=True,
               lora_r=16, lora_alpha=32, max_length=1024, warmup_steps=0, save_steps=10_000, logging_steps=10_000,
               seed=0, report_to="none")
    t0 = time.perf_counter()
    result = train_preferences(model, tok, pairs, PreferenceConfig(**cfg), resume=False)
    total = time.perf_counter() - t0
    steps = result.summary().get("global_step") or args.train_steps
    train_seconds = result.summary().get("train_runtime") or total
    n_tokens = sum(len(tok(p + " " + r).input_ids) for p, r in zip(pairs.prompt, pairs.response_0))
    tokens_per_step = 2 * n_tokens / n * args.train_batch_size
    # one step's FLOPs, approximately: forward and backward (LoRA: input gradients through every
    # layer) of the LoRA model on a batch of the step's sequences, counted untimed
    batch = tok([p + " " + r for p, r in zip(pairs.prompt[:2 * args.train_batch_size],
                                             pairs.response_0[:2 * args.train_batch_size])],
                return_tensors="pt", padding=True).to(model.device)
    trained = result.model
    trained.train()

    def step():
        out = trained(**batch)
        out.logits.float().mean().backward()

    flops = counted_flops(step)
    trained.zero_grad(set_to_none=True)
    sec_per_step = train_seconds / steps
    return {"steps": steps, "seconds_per_step": sec_per_step, "trained_tokens_per_s": tokens_per_step / sec_per_step,
            "step_tflop": flops / 1e12, "mfu": flops / sec_per_step / 1e12 / peak_tflops,
            "wall_incl_reference_pass": total}


def check_scoring(model, tok, prompts, args, device: str, peak_tflops: float) -> dict:
    from dualign.models.features import pooled_features

    responses = [" ".join(["the answer is that it depends on the speed"] * 6)] * len(prompts)
    pooled_features(model, tok, prompts[:4], responses[:4], pooling="mean", template="User: {prompt}\nAssistant:")
    feats, sec = timed(lambda: pooled_features(model, tok, prompts, responses, pooling="mean", batch_size=64,
                                               template="User: {prompt}\nAssistant:"), device)
    n_tokens = sum(len(tok(f"User: {p}\nAssistant:" + r).input_ids) for p, r in zip(prompts, responses))
    flops = counted_flops(lambda: pooled_features(model, tok, prompts[:8], responses[:8], pooling="mean",
                                                  template="User: {prompt}\nAssistant:"))
    per_token = flops / sum(len(tok(f"User: {p}\nAssistant:" + r).input_ids) for p, r in zip(prompts[:8],
                                                                                             responses[:8]))
    return {"tokens_per_s": n_tokens / sec, "seconds": sec, "rows": feats.shape[0],
            "utilization": per_token * n_tokens / sec / 1e12 / peak_tflops}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2-135m,llama-2-7b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--smoke", action="store_true", help="toy shape and sizes: checks the script itself, any device")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sample-batch-size", type=int, default=256)
    ap.add_argument("--train-pairs", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--train-batch-size", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=60)
    ap.add_argument("--response-words", type=int, default=120)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shapes, args.prompts, args.num_samples, args.max_new_tokens = "toy", 4, 2, 8
        args.train_pairs, args.train_steps, args.train_batch_size = 8, 2, 2
        args.prompt_words, args.response_words, args.sample_batch_size = 8, 8, 8
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    peak = matmul_peak_tflops(device, dtype, 8192 if device.startswith("cuda") else 1024)
    print(f"device {name}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')} matmul peak "
          f"{peak:.3g} TFLOP/s")
    prompts = [PROMPT.format(i=i) for i in range(args.prompts)]
    results = {"device": name, "dtype": str(dtype), "matmul_peak_tflops": peak, "shapes": {}}
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model, tok, billions = build_model(shape, tmp / "model", device, dtype)
            print(f"\n== {shape}: {billions:.2f} B parameters (random weights)")
            r = {"parameters_billions": billions}
            r["sampling"] = s = check_sampling(model, tok, tmp / "model", prompts, args, device)
            line = f"sampling, HF backend: {s['hf_tokens_per_s']:,.0f} tokens/s ({s['rows']} rows)"
            if "vllm_tokens_per_s" in s:
                line += (f"; vLLM: {s['vllm_tokens_per_s']:,.0f} tokens/s incl. start-up "
                         f"({s['vllm_tokens_per_s'] / s['hf_tokens_per_s']:.1f}× HF)")
            else:
                line += f"; vLLM: {s['vllm']}"
            print(line, flush=True)
            r["scoring"] = c = check_scoring(model, tok, prompts, args, device, peak)
            print(f"scoring (forward, mean-pooled): {c['tokens_per_s']:,.0f} tokens/s, "
                  f"{c['utilization']:.0%} of the matmul peak", flush=True)
            r["training"] = t = check_training(model, tok, args, device, peak, tmp)
            print(f"training (LoRA r=16, {'bf16' if device.startswith('cuda') else 'fp32'}): "
                  f"{t['seconds_per_step']:.3f} s/step, {t['trained_tokens_per_s']:,.0f} tokens/s, "
                  f"MFU {t['mfu']:.0%}", flush=True)
            results["shapes"][shape] = r
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
