"""Train a policy on (pseudo-)preference pairs with the soft-label DPO loss, on HF `Trainer`.

The pieces, in the order `train_preferences` uses them:

1. `tokenize_pairs`: (prompt, y0, y1) → token ids through `dualign.models.text.encode_pairs`,
   the tokenization every other stage uses.
2. Reference log-probs log π_ref(y|x), computed ONCE, before training, on the untouched
   model (the reference) by the training forward itself under no_grad (`reference_logps`;
   equal to `dualign.models.logprobs.logprobs` within 1e-4), cached in the output
   directory (or taken from the pairs' `ref_logp_0`/`ref_logp_1` columns). A training
   step then runs the policy only.
3. `PreferenceTrainer`, a `transformers.Trainer` whose `compute_loss` runs y1 and y0 of a
   batch in one forward pass and applies `pseudo_preference_loss`; batches are grouped by
   length (seeded per epoch, so a resumed run sees the same batches). Accelerate,
   DeepSpeed/FSDP, gradient accumulation, mixed precision, `report_to` and checkpoints
   come from `Trainer`.
4. Save: PEFT adapter (default) or merged/full safetensors weights, the tokenizer, a model
   card (README.md) and `dualign_train.json`; `load_trained` reads them back.

A killed run resumes from its last checkpoint and ends with the same weights as an
uninterrupted one (same seed): checkpoints hold optimizer, scheduler and RNG states, and
the batch order depends only on (seed, epoch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError, settings_from_dict
from ..models.loading import cache_kwarg, forward_params
from ..models.text import encode_pairs, response_logps
from ..runio import array_digest, atomic_path, write_json, write_text
from .frozen_blocks import capture_block_inputs, from_block, transformer_blocks
from .losses import hard_labels, pseudo_preference_loss

PAIR_COLUMNS = ("prompt", "response_0", "response_1", "label")
MODEL_DIRNAME = "model"
RESULT_FILE = "train_result.json"
REF_CACHE_FILE = "ref_logps.npz"
RUN_FILE = "train_run.json"


@dataclass
class PreferenceConfig:
    """Settings of one preference-training run; every field maps 1:1 to a YAML key.

    Attributes
    ----------
    beta : float
        KL coefficient β of the loss (the same β as the dual's).
    label_mode : {"soft", "hard"}
        "soft": train on p directly (default: same optimum, less variance). "hard": draw
        Bernoulli(p) labels once with `seed` and run ordinary DPO, as the paper's code does.
    sft_weight : float
        Weight α of a label-weighted likelihood term added to the loss,
        α · [p · NLL(y1) + (1 − p) · NLL(y0)] with NLL the mean negative log-likelihood per
        response token (as in RPO, Pang et al. 2024). 0 (default): the pure pseudo-preference
        loss, whose optimum is exactly π_λ*. Off-policy pairs (text π_ref did not write) move
        the relative log-ratio but can leave the likely generations unchanged; α > 0 pulls the
        policy toward the preferred texts themselves, at the price of an optimum that is no
        longer π_λ* (the dual's predictions then describe the target, not the trained model).
    use_lora : bool
        Train a LoRA adapter (default; the only practical choice on CPU) or all weights.
    lora_r, lora_alpha, lora_dropout : int, int, float
        LoRA rank, scaling numerator and dropout.
    lora_target_modules : str or list of str
        Module names (or "all-linear": every linear layer but the output head).
    lora_last_layers : int
        Adapt only the last N transformer blocks (0: all). Nothing below the lowest adapted
        block needs a gradient, so backpropagation stops there: on SmolLM2-135M (30 blocks,
        2 CPU cores) forward + backward of 16 × 75 tokens took 5.5 s with N = 10 against 9.5 s
        with all blocks; a whole demo training step, about 3.0 s against 3.5–4 s.
    cache_frozen_blocks : bool
        With `lora_last_layers`: keep, from the reference pass, what enters the lowest
        adapted block for every pair, and train from it, so the frozen blocks below run once
        per pair instead of once per step and epoch (`dualign.train.frozen_blocks`; same
        losses up to float rounding). Memory: about pairs × (prompt + 2 responses) tokens ×
        hidden size × 4 bytes (the demo: 748 × ~120 × 576 × 4 ≈ 210 MB). A model whose
        forward does not run exactly from a block's input is detected on the first batch
        and trained without the cache. Not with gradient checkpointing.
    max_length : int
        Most tokens of prompt + response; the response is cut first, then the prompt from
        the left (`encode_pairs`).
    max_response_length : int
        Train on the first this many tokens of each response (0: whole responses, up to
        `max_length`). The labels still come from the whole texts; a cut response loses its
        EOS. Whether a model refuses or complies is decided in an answer's first tokens: a
        prefix puts the loss where that decision is, at a fraction of the compute (the
        optimum is no longer π_λ* over whole responses; dualign's demo uses 16).
    template : str or None
        Prompt template with a `{prompt}` slot; None: the tokenizer's chat template, else
        the PKU template.
    append_eos : bool
        End each response with EOS (the model learns where to stop).
    learning_rate, num_train_epochs, max_steps, warmup_steps, weight_decay, max_grad_norm,
    lr_scheduler_type, optim :
        As in `transformers.TrainingArguments` (`max_steps > 0` overrides epochs).
    per_device_train_batch_size : int
        Pairs per micro-batch (a forward pass sees twice as many sequences).
    gradient_accumulation_steps : int
    group_by_length : bool
        Batch pairs of similar length together (less padding, faster).
    share_prompt : bool
        Run each pair's prompt through the model once and reuse its key/value cache for y0
        and y1 (same result and gradient, fewer tokens). Off automatically with gradient
        checkpointing (no cache then), under DDP/DeepSpeed/FSDP (two forward passes per
        step, not verified there), and for batches whose y0/y1 prompts were truncated
        differently.
    seed : int
        Seeds LoRA init, batch order, dropout and hard labels.
    output_dir : str
        Checkpoints, the reference log-prob cache, the final model (`<output_dir>/model`).
    save_steps : int
        Checkpoint every this many optimizer steps (what a killed run resumes from).
    save_total_limit : int or None
        Keep at most this many checkpoints.
    logging_steps : int
    report_to : str or list of str
        "none", "tensorboard", "wandb", ... (as in `TrainingArguments`).
    bf16, fp16 : bool
        Mixed precision (needs hardware support).
    gradient_checkpointing : bool
    save_format : {"adapter", "merged"}
        With LoRA: save the adapter only (small; loads onto the base) or merge it into the
        base and save full safetensors weights. Without LoRA full weights are always saved.
    ref_batch_size : int
        Pairs per forward pass when computing reference log-probs.
    training_args : dict
        Any other `transformers.TrainingArguments` field, passed through (e.g. `deepspeed`,
        `fsdp`, `fsdp_config`, `torch_compile`, `optim_args`); these win over the above.
    """

    beta: float = 0.1
    label_mode: str = "soft"
    sft_weight: float = 0.0
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: Any = "all-linear"
    lora_last_layers: int = 0
    cache_frozen_blocks: bool = False
    max_length: int = 512
    max_response_length: int = 0
    template: str | None = None
    append_eos: bool = True
    learning_rate: float = 1e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    warmup_steps: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    optim: str = "adamw_torch"
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    group_by_length: bool = True
    share_prompt: bool = True
    seed: int = 0
    output_dir: str = "runs/preference"
    save_steps: int = 50
    save_total_limit: int | None = 2
    logging_steps: int = 10
    report_to: Any = "none"
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    save_format: str = "adapter"
    ref_batch_size: int = 8
    training_args: dict = field(default_factory=dict)

    # Fields that do not change the trained weights: a resumed run may change them.
    _NON_TRAINING = ("output_dir", "save_steps", "save_total_limit", "logging_steps",
                     "report_to", "save_format", "ref_batch_size", "cache_frozen_blocks")

    def __post_init__(self):
        if not self.beta > 0:
            raise InputError(f"beta must be > 0, got {self.beta}", field="beta")
        if not self.sft_weight >= 0:
            raise InputError(f"must be >= 0, got {self.sft_weight}", field="sft_weight")
        if self.label_mode not in ("soft", "hard"):
            raise InputError(f"must be 'soft' or 'hard', not {self.label_mode!r}", field="label_mode")
        if self.save_format not in ("adapter", "merged"):
            raise InputError(f"must be 'adapter' or 'merged', not {self.save_format!r}",
                             field="save_format")
        for name in ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "save_steps", "logging_steps", "ref_batch_size", "lora_r"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", field=name)
        for name in ("max_response_length", "lora_last_layers"):  # 0: off
            if int(getattr(self, name)) < 0:
                raise InputError(f"must be >= 0, got {getattr(self, name)}", field=name)
        if self.cache_frozen_blocks and not (self.use_lora and self.lora_last_layers):
            raise InputError("needs use_lora and lora_last_layers > 0 (only blocks below the "
                             "adapted ones are frozen)", field="cache_frozen_blocks")
        if self.cache_frozen_blocks and self.gradient_checkpointing:
            raise InputError("cannot be combined with gradient_checkpointing (the top blocks would "
                             "be recomputed from the full model)", field="cache_frozen_blocks")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise InputError("set max_steps > 0 or num_train_epochs > 0", field="num_train_epochs")

    @classmethod
    def from_dict(cls, d: dict | None, section: str = "train") -> "PreferenceConfig":
        """Build from a YAML mapping (the config's `section`). Raises InputError naming
        `section.key` and the closest valid name for an unknown key, and naming `section`
        for a value of the wrong type."""
        return settings_from_dict(cls, d, section, "training settings")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["lora_target_modules"], tuple):
            d["lora_target_modules"] = list(d["lora_target_modules"])
        return d

    def training_digest(self) -> str:
        """Digest of the fields that determine the trained weights."""
        d = {k: v for k, v in self.to_dict().items() if k not in self._NON_TRAINING}
        return array_digest(np.frombuffer(json.dumps(d, sort_keys=True).encode(), dtype=np.uint8))

    def training_arguments(self, **overrides):
        """The `transformers.TrainingArguments` of this config (`overrides` win)."""
        from transformers import TrainingArguments

        kw = dict(
            output_dir=str(self.output_dir), learning_rate=self.learning_rate,
            num_train_epochs=self.num_train_epochs, max_steps=self.max_steps,
            warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm, lr_scheduler_type=self.lr_scheduler_type,
            optim=self.optim, per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps, seed=self.seed,
            save_strategy="steps", save_steps=self.save_steps,
            save_total_limit=self.save_total_limit, logging_steps=self.logging_steps,
            report_to=self.report_to, bf16=self.bf16, fp16=self.fp16,
            activation_checkpointing=self.gradient_checkpointing,
            # the collator needs our extra keys (labels p, reference log-probs)
            remove_unused_columns=False, label_names=["pref_label"],
            dataloader_num_workers=0, disable_tqdm=False,
            dataloader_pin_memory=_cuda_available(),
        )
        kw.update(self.training_args)
        kw.update(overrides)
        return TrainingArguments(**kw)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class TrainResult:
    """What `train_preferences` returns.

    Attributes
    ----------
    model : torch.nn.Module
        The trained policy, in eval mode: a `peft.PeftModel` (adapter saved) or a plain
        causal LM (merged or full fine-tune). With a PeftModel,
        `with model.disable_adapter():` gives back the reference policy.
    tokenizer : transformers tokenizer
    model_dir : pathlib.Path
        `<output_dir>/model`, loadable with `load_trained(model_dir, base_model)`.
    output_dir : pathlib.Path
    global_step : int
        Optimizer steps taken in total (over all resumptions).
    train_loss : float
        Mean training loss of the run's steps (of the last session when resumed).
    train_runtime : float
        Seconds spent in the training loop (this session).
    ref_seconds : float
        Seconds spent computing reference log-probs (0 when cached or given).
    ref_logp_0, ref_logp_1 : numpy.ndarray, shape (n,)
        log π_ref of every pair's responses, in input order: store them with the pairs.
    labels : numpy.ndarray, shape (n,)
        The labels trained on (hard draws when `label_mode="hard"`).
    log_history : list of dict
        `Trainer.state.log_history`: loss, learning rate, reward margins, accuracy per log.
    resumed_from : str or None
        The checkpoint this session resumed from.
    skipped : bool
        True when the output directory already held the finished run (nothing trained).
    """

    model: Any
    tokenizer: Any
    model_dir: Path
    output_dir: Path
    global_step: int
    train_loss: float
    train_runtime: float
    ref_seconds: float
    ref_logp_0: np.ndarray
    ref_logp_1: np.ndarray
    labels: np.ndarray
    log_history: list = field(default_factory=list)
    resumed_from: str | None = None
    skipped: bool = False

    def summary(self) -> dict:
        """JSON-able summary (no model, no arrays)."""
        return {"model_dir": str(self.model_dir), "global_step": self.global_step,
                "train_loss": self.train_loss, "train_runtime": self.train_runtime,
                "ref_seconds": self.ref_seconds, "n_pairs": int(len(self.labels)),
                "resumed_from": self.resumed_from}


# ---------------------------------------------------------------------------------------
# data

def validate_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """Check a pairs table: columns prompt, response_0, response_1, label (p in [0, 1]); an
    optional `offset` column (finite, ≥ 0: the logit margin of `pseudo_preference_loss`).

    Returns
    -------
    pandas.DataFrame with a fresh 0..n-1 index.

    Raises
    ------
    InputError
        Missing column, empty table, non-string text, a label outside [0, 1], or a negative
        or non-finite offset.
    """
    if not isinstance(pairs, pd.DataFrame):
        raise InputError(f"pairs must be a pandas DataFrame, not {type(pairs).__name__}")
    for c in PAIR_COLUMNS:
        if c not in pairs.columns:
            raise InputError(f"missing column (columns are: {', '.join(map(str, pairs.columns))})",
                             field=c)
    if len(pairs) == 0:
        raise InputError("no preference pairs to train on")
    pairs = pairs.reset_index(drop=True)
    for c in PAIR_COLUMNS[:3]:
        bad = ~pairs[c].map(lambda v: isinstance(v, str))
        if bad.any():
            raise InputError("expected text", record=int(np.flatnonzero(bad.to_numpy())[0]), field=c)
    lab = pd.to_numeric(pairs["label"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~((lab >= 0) & (lab <= 1))
    if bad.any():
        raise InputError("label must be a probability in [0, 1]",
                         record=int(np.flatnonzero(bad)[0]), field="label")
    if "offset" in pairs.columns:
        off = pd.to_numeric(pairs["offset"], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~(np.isfinite(off) & (off >= 0))
        if bad.any():
            raise InputError("offset must be a finite number >= 0", record=int(np.flatnonzero(bad)[0]),
                             field="offset")
    return pairs


def tokenize_pairs(tokenizer, pairs: pd.DataFrame, config: PreferenceConfig) -> list[dict]:
    """Token ids of every pair, as `encode_pairs` makes them.

    Returns
    -------
    list of dict, length n
        Keys `prompt_ids`, `response_ids_0`, `response_ids_1` (lists of int). The prompt
        is tokenized with each response separately, so truncation may cut it differently
        for y0 and y1; `prompt_ids_0`/`prompt_ids_1` hold each version.
    """
    prompts = pairs["prompt"].tolist()
    kw = dict(template=config.template, append_eos=config.append_eos, max_length=config.max_length)
    enc0 = encode_pairs(tokenizer, prompts, pairs["response_0"].tolist(), **kw)
    enc1 = encode_pairs(tokenizer, prompts, pairs["response_1"].tolist(), **kw)
    if config.max_response_length:
        cut = config.max_response_length
        enc0, enc1 = ([(p, r[:cut]) for p, r in enc] for enc in (enc0, enc1))
    return [{"prompt_ids_0": p0, "response_ids_0": r0, "prompt_ids_1": p1, "response_ids_1": r1}
            for (p0, r0), (p1, r1) in zip(enc0, enc1)]


def _tokens_digest(feats: list[dict]) -> str:
    flat = []
    for f in feats:
        for k in ("prompt_ids_0", "response_ids_0", "prompt_ids_1", "response_ids_1"):
            flat.extend(f[k])
            flat.append(-1)  # separator, so different splits of the same ids differ
    return array_digest(np.asarray(flat, dtype=np.int64))


class PreferenceDataset:
    """Map-style dataset of tokenized pairs with labels and reference log-probs.

    Parameters
    ----------
    features : list of dict
        From `tokenize_pairs`.
    labels, ref_logp_0, ref_logp_1 : array_like, shape (n,)
    offsets : array_like, shape (n,), optional
        Per-pair logit margins (`pseudo_preference_loss`); default 0.
    """

    def __init__(self, features, labels, ref_logp_0, ref_logp_1, offsets=None):
        n = len(features)
        offsets = np.zeros(n) if offsets is None else offsets
        for name, a in (("labels", labels), ("ref_logp_0", ref_logp_0), ("ref_logp_1", ref_logp_1),
                        ("offsets", offsets)):
            if len(a) != n:
                raise ValueError(f"{name} has {len(a)} rows but there are {n} pairs")
        self.features = features
        self.labels = np.asarray(labels, dtype=np.float64)
        self.ref_logp_0 = np.asarray(ref_logp_0, dtype=np.float64)
        self.ref_logp_1 = np.asarray(ref_logp_1, dtype=np.float64)
        self.offsets = np.asarray(offsets, dtype=np.float64)
        # a batch is padded to its longest sequence, y0 or y1
        self.lengths = [max(len(f["prompt_ids_0"]) + len(f["response_ids_0"]),
                            len(f["prompt_ids_1"]) + len(f["response_ids_1"])) for f in features]

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return {**self.features[i], "label": self.labels[i], "offset": self.offsets[i],
                "ref_logp_0": self.ref_logp_0[i], "ref_logp_1": self.ref_logp_1[i]}


class PreferenceCollator:
    """Pad a list of pairs into one batch.

    Two layouts. Concatenated (default, always valid): the B y1-sequences, then the B
    y0-sequences, each prompt + response, right-padded. Shared prompt (`share_prompt=True`
    and every pair's y0 and y1 carry the same prompt ids): each prompt once, left-padded,
    and the 2B responses separately, so the prompt runs through the model once per pair
    instead of twice (the trainer reuses its key/value cache for both responses).

    Returns (as a dict of tensors)
    ------------------------------
    Concatenated layout:
        input_ids, attention_mask, response_mask : torch.LongTensor, shape (2B, T)
            `response_mask` is 1 on response tokens only (prompt and padding masked out of
            the log-probs).
    Shared-prompt layout:
        prompt_input_ids, prompt_attention_mask : torch.LongTensor, shape (B, P), left-padded
        input_ids, attention_mask, response_mask : torch.LongTensor, shape (2B, R)
            Responses only, right-padded, interleaved: row 2i is y1 of pair i, row 2i+1 its y0.
    Items that carry the frozen blocks' output (`block_input_prompt_1`, `block_input_response_1`,
    ..._0: float tensors (n_tokens, hidden), `cache_frozen_blocks`) add, padded like the ids:
    `inputs_embeds` (2B, T or R, hidden) and, shared-prompt layout, `prompt_inputs_embeds`
    (B, P, hidden).
    Both:
        pref_label : torch.FloatTensor, shape (B,)
            p = P(y1 preferred). (Not called `labels`: `Trainer` would treat it as token labels.)
        ref_logp_1, ref_logp_0 : torch.FloatTensor, shape (B,)
        pref_offset : torch.FloatTensor, shape (B,)
            The pairs' logit margins (0 unless the pairs have an `offset` column).
    """

    def __init__(self, pad_token_id: int, share_prompt: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.share_prompt = share_prompt

    def __call__(self, items: list[dict]) -> dict:
        import torch

        f32 = lambda k: torch.tensor([float(it[k]) for it in items], dtype=torch.float32)  # noqa: E731
        out = {"pref_label": f32("label"), "ref_logp_1": f32("ref_logp_1"),
               "ref_logp_0": f32("ref_logp_0"),
               "pref_offset": torch.tensor([float(it.get("offset", 0.0)) for it in items], dtype=torch.float32)}
        if self.share_prompt and all(it["prompt_ids_0"] == it["prompt_ids_1"] for it in items):
            prompts = [it["prompt_ids_1"] for it in items]
            P = max(len(p) for p in prompts)
            pid = torch.full((len(items), P), self.pad_token_id, dtype=torch.long)
            pm = torch.zeros((len(items), P), dtype=torch.long)
            for i, p in enumerate(prompts):
                pid[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
                pm[i, P - len(p):] = 1
            ids, att, _ = self._pad([([], r) for it in items
                                     for r in (it["response_ids_1"], it["response_ids_0"])])
            out.update(prompt_input_ids=pid, prompt_attention_mask=pm, input_ids=ids,
                       attention_mask=att, response_mask=att.clone())
            if "block_input_response_1" in items[0]:
                out["prompt_inputs_embeds"] = _pad_states([it["block_input_prompt_1"] for it in items], P, left=True)
                out["inputs_embeds"] = _pad_states([it[f"block_input_response_{j}"] for it in items for j in (1, 0)],
                                                   ids.shape[1])
            return out
        ids, att, resp = self._pad([(it["prompt_ids_1"], it["response_ids_1"]) for it in items]
                                   + [(it["prompt_ids_0"], it["response_ids_0"]) for it in items])
        out.update(input_ids=ids, attention_mask=att, response_mask=resp)
        if "block_input_response_1" in items[0]:
            seqs = [torch.cat([it[f"block_input_prompt_{j}"], it[f"block_input_response_{j}"]])
                    for j in (1, 0) for it in items]
            out["inputs_embeds"] = _pad_states(seqs, ids.shape[1])
        return out

    def _pad(self, seqs):
        import torch

        T = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((len(seqs), T), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(seqs), T), dtype=torch.long)
        resp = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, (p, r) in enumerate(seqs):
            n = len(p) + len(r)
            ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
            att[i, :n] = 1
            resp[i, len(p):n] = 1
        return ids, att, resp


def _pad_states(seqs, T: int, left: bool = False):
    """Stack hidden-state sequences (each (n_i, hidden)) into (len(seqs), T, hidden), zeros
    in the padding (masked out wherever it is used), on the left or the right."""
    out = seqs[0].new_zeros((len(seqs), T, seqs[0].shape[-1]))
    for i, h in enumerate(seqs):
        if left:
            out[i, T - len(h):] = h
        else:
            out[i, :len(h)] = h
    return out


class EpochSeededLengthSampler:
    """Sample order that depends only on (seed, epoch): length-grouped or a plain shuffle.

    Length grouping follows `transformers.trainer_pt_utils.get_length_grouped_indices`
    (shuffle, sort mega-batches by length, longest batch first). Seeding per epoch instead
    of drawing from the global RNG makes a resumed run replay the same batches.
    """

    def __init__(self, lengths, batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths = list(lengths)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.group_by_length:
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))
        return iter(torch.randperm(len(self.lengths), generator=g).tolist())


# ---------------------------------------------------------------------------------------
# trainer

def pair_logps(model, batch):
    """log π(y1|x) and log π(y0|x) of a collated batch, each shape (B,), for either layout.

    Concatenated layout: one forward pass over the 2B sequences, building logits only from
    the first response position on (`logits_to_keep`). Shared-prompt layout: the B prompts
    once (keeping their key/value cache and last logits), then the 2B responses on top of
    the cache repeated per pair; gradients flow through the cache into the prompt's
    activations, so value and gradient equal the concatenated computation.

    Parameters
    ----------
    model : causal LM (or a PEFT/DDP wrapper of one)
    batch : dict of torch.Tensor
        From `PreferenceCollator`, on the model's device. A batch with `inputs_embeds` (the
        frozen blocks' recorded output) must be run inside `frozen_blocks.from_block`.

    Returns
    -------
    logp_1, logp_0 : torch.Tensor, shape (B,), float32
    """
    if "prompt_input_ids" in batch:
        return _shared_prompt_logps(model, batch)
    ids, att, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    first = int(resp.argmax(-1).min())
    keep = ids.shape[1] - first + 1 if first > 0 else ids.shape[1]
    kwargs = {**_model_inputs(batch, "input_ids", "inputs_embeds"), "attention_mask": att, "use_cache": False}
    if keep < ids.shape[1] and "logits_to_keep" in forward_params(model):
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits
    T = logits.shape[1]
    logp = response_logps(logits, ids[:, -T:], resp[:, -T:])
    return logp.chunk(2, dim=0)


def _model_inputs(batch, ids_key: str, embeds_key: str) -> dict:
    """The model's input: the frozen blocks' recorded output when the batch carries it (the
    caller runs the model `from_block`), else the token ids."""
    if embeds_key in batch:
        return {"inputs_embeds": batch[embeds_key]}
    return {"input_ids": batch[ids_key]}


def response_lengths(batch):
    """Response token counts (n_1, n_0) of a collated batch, each shape (B,), either layout:
    shared-prompt rows alternate y1, y0; concatenated rows are all y1, then all y0."""
    n = batch["response_mask"].sum(-1).float()
    return (n[0::2], n[1::2]) if "prompt_input_ids" in batch else n.chunk(2, dim=0)


def label_weighted_nll(logp_1, logp_0, n_1, n_0, labels):
    """Mean over pairs of p · NLL(y1) + (1 − p) · NLL(y0), NLL = −log π(y|x) / |y| (nats per
    token); all arguments shape (B,). The likelihood term of `PreferenceConfig.sft_weight`."""
    p = labels.to(logp_1.dtype)
    return (-(p * logp_1 / n_1.clamp(min=1)) - (1 - p) * logp_0 / n_0.clamp(min=1)).mean()


def _shared_prompt_logps(model, batch):
    """log π(y1|x) and log π(y0|x), shape (B,) each, running each prompt once for both answers.

    `batch` is the shared-prompt layout of `PreferenceCollator`: B left-padded prompts and 2B
    right-padded responses (row 2i: pair i's y1, row 2i+1: its y0). The prompts run first
    with a KV cache, keeping only the last position's logits (they predict each response's
    first token); the cache is repeated so that every prompt row serves its two responses;
    then the responses run on that cache with position ids that continue each prompt's own
    length (left padding makes prompt lengths differ) and an attention mask that covers the
    prompt's real tokens and the response's. The sum over response tokens of their
    log-probabilities equals the concatenated layout's to float tolerance (tests).
    """
    import torch

    pm = batch["prompt_attention_mask"]
    rid, rm = batch["input_ids"], batch["attention_mask"]
    ppos = (pm.cumsum(-1) - 1).clamp(min=0)
    out = model(**_model_inputs(batch, "prompt_input_ids", "prompt_inputs_embeds"), attention_mask=pm,
                position_ids=ppos, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(2)  # rows 2i and 2i+1: pair i's y1 and y0
    rpos = pm.sum(-1).repeat_interleave(2)[:, None] + torch.arange(rid.shape[1], device=rid.device)[None]
    att = torch.cat([pm.repeat_interleave(2, dim=0), rm], dim=1)
    logits = model(**_model_inputs(batch, "input_ids", "inputs_embeds"), attention_mask=att, position_ids=rpos,
                   use_cache=True, **{cache_kwarg(model): cache}).logits
    # the first response token is predicted by the prompt's last position
    first = out.logits[:, -1].float().repeat_interleave(2, dim=0)
    lp_first = first.gather(1, rid[:, :1]).squeeze(1) - torch.logsumexp(first, dim=-1)
    logp = lp_first * rm[:, 0].to(first.dtype) + response_logps(logits, rid, rm)
    return logp[0::2], logp[1::2]


def _make_trainer_class():
    # transformers is imported lazily (the dual math installs without it), so the subclass
    # is built on first use.
    import torch
    from transformers import Trainer

    class PreferenceTrainer(Trainer):
        """`transformers.Trainer` with the soft-label DPO loss on precomputed reference log-probs.

        Parameters
        ----------
        beta : float
            KL coefficient β.
        *args, **kwargs
            As `Trainer` (model, args, train_dataset=PreferenceDataset,
            data_collator=PreferenceCollator, processing_class, callbacks).
        """

        def __init__(self, *args, beta: float, sft_weight: float = 0.0, frozen_blocks: int = 0, **kwargs):
            super().__init__(*args, **kwargs)
            self.beta = float(beta)
            self.sft_weight = float(sft_weight)
            # > 0: the dataset carries the output of the frozen blocks below this one
            self.frozen_blocks = int(frozen_blocks)
            # our loss is a mean over pairs; Trainer must divide it by the accumulation steps
            self.model_accepts_loss_kwargs = False
            self._pref_metrics: dict[str, list[float]] = {}

        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            return EpochSeededLengthSampler(
                ds.lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                seed=self.args.seed, group_by_length=getattr(self, "group_by_length", True))

        def policy_logps(self, model, inputs):
            """log π_θ(y1|x), log π_θ(y0|x), each shape (B,) (see `pair_logps`)."""
            if self.frozen_blocks and "inputs_embeds" in inputs:
                with from_block(model, self.frozen_blocks):
                    return pair_logps(model, inputs)
            return pair_logps(model, inputs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logp_1, logp_0 = self.policy_logps(model, inputs)
            ref_1 = inputs["ref_logp_1"].to(logp_1.dtype)
            ref_0 = inputs["ref_logp_0"].to(logp_0.dtype)
            p = inputs["pref_label"]
            loss = pseudo_preference_loss(logp_1, logp_0, ref_1, ref_0, p, self.beta,
                                          offset=inputs.get("pref_offset"))
            if self.sft_weight > 0:
                nll = label_weighted_nll(logp_1, logp_0, *response_lengths(inputs), p)
                loss = loss + self.sft_weight * nll
                self._pref_metrics.setdefault("sft/nll", []).append(nll.item())
            with torch.no_grad():
                margin = self.beta * ((logp_1 - ref_1) - (logp_0 - ref_0))
                target = torch.logit(p.clamp(1e-6, 1 - 1e-6))
                m = self._pref_metrics
                m.setdefault("rewards/margins", []).append(margin.mean().item())
                # agreement in sign with the label (0.5-labels count as agreeing)
                m.setdefault("rewards/accuracies", []).append(
                    ((margin > 0) == (p > 0.5)).float().mean().item())
                # how far βΔ is from its optimum logit(p) (soft labels only)
                m.setdefault("rewards/target_gap", []).append((margin - target).abs().mean().item())
            return (loss, {"logp_1": logp_1, "logp_0": logp_0}) if return_outputs else loss

        def log(self, logs, start_time=None):
            for k, v in self._pref_metrics.items():
                if v:
                    logs[k] = float(np.mean(v))
            self._pref_metrics = {}
            super().log(logs, start_time)

    return PreferenceTrainer


_TRAINER_CLASS = None


def preference_trainer_class():
    """The `PreferenceTrainer` class (a `transformers.Trainer` subclass)."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        _TRAINER_CLASS = _make_trainer_class()
    return _TRAINER_CLASS


# ---------------------------------------------------------------------------------------
# reference log-probs

def _model_fingerprint(model) -> str:
    """Cheap identity of a model's weights: its class, size and its first and last tensors."""
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    first, last = params[0].detach().float().cpu().numpy(), params[-1].detach().float().cpu().numpy()
    tag = np.frombuffer(f"{type(model).__name__}:{n}".encode(), dtype=np.uint8)
    return array_digest(tag, first, last)


def reference_logps(model, tokenizer, pairs: pd.DataFrame, config: PreferenceConfig,
                    features: list[dict] | None = None, disable_adapter: bool = False,
                    progress: bool = True, record_block: int = 0):
    """log π_ref(y0|x) and log π_ref(y1|x) of every pair, with `model` as the reference.

    Computed by the very code that computes the policy's log-probs in training (same
    tokens, same collator layout, `pair_logps`), under `torch.no_grad` in eval mode, in
    length-sorted batches of `config.ref_batch_size` pairs; so before the first update Δ is
    0 up to float rounding, and the values equal `dualign.models.logprobs.logprobs` (within
    1e-4). The shared-prompt layout runs each prompt once.

    Parameters
    ----------
    model, tokenizer : the reference policy and its tokenizer
    pairs : pandas.DataFrame with `prompt`, `response_0`, `response_1`
    config : PreferenceConfig
        Tokenization (`template`, `max_length`, `append_eos`), `ref_batch_size`, `share_prompt`.
    features : list of dict, optional
        `tokenize_pairs(tokenizer, pairs, config)`, when already computed.
    disable_adapter : bool
        Score a PEFT model with its adapters off (its base is the reference).
    progress : bool
        Show a tqdm bar (pairs).
    record_block : int
        > 0: also record what enters this transformer block for every pair
        (`cache_frozen_blocks`), and check on the first batch that the model run
        `from_block` on it gives the same log-probs (within 1e-3 nats).

    Returns
    -------
    ref_logp_0, ref_logp_1 : numpy.ndarray, shape (n,), float64, in input order
    block_inputs : list of dict or None
        Only with `record_block`: per pair, float32 CPU tensors (n_tokens, hidden) under
        `block_input_prompt_1`, `block_input_response_1`, `block_input_prompt_0`,
        `block_input_response_0` (what `PreferenceCollator` pads into `inputs_embeds`);
        None when the check failed (the model does not run exactly from a block's input).
    """
    import contextlib

    import torch
    from tqdm.auto import tqdm

    from ..models.logprobs import length_batches

    feats = features if features is not None else tokenize_pairs(tokenizer, pairs, config)
    collate = PreferenceCollator(_pad_id(tokenizer),
                                 share_prompt=config.share_prompt and _supports_shared_prompt(model))
    lengths = [max(len(f["prompt_ids_0"]) + len(f["response_ids_0"]),
                   len(f["prompt_ids_1"]) + len(f["response_ids_1"])) for f in feats]
    device = next(model.parameters()).device
    r0 = np.zeros(len(feats))
    r1 = np.zeros(len(feats))
    records: list | None = [None] * len(feats) if record_block else None
    captured: list = []
    checked = False
    ctx = (model.disable_adapter() if disable_adapter and hasattr(model, "disable_adapter")
           else contextlib.nullcontext())
    capture = (capture_block_inputs(model, record_block, captured) if record_block
               else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    try:
        with ctx, capture, torch.no_grad(), tqdm(total=len(feats), desc="reference log-probs", unit="pair",
                                                 disable=not progress) as bar:
            for idx in length_batches(lengths, config.ref_batch_size):
                items = [{**feats[i], "label": 0.0, "ref_logp_0": 0.0, "ref_logp_1": 0.0}
                         for i in idx]
                batch = {k: v.to(device) for k, v in collate(items).items()}
                captured.clear()
                lp1, lp0 = pair_logps(model, batch)
                r1[idx], r0[idx] = lp1.double().cpu().numpy(), lp0.double().cpu().numpy()
                bar.update(len(idx))
                if records is not None:
                    recs = _split_block_inputs(batch, captured, items)
                    if not checked and not _runs_from_block(model, record_block, collate, items, recs, lp1, lp0):
                        warnings.warn(f"{type(model).__name__} does not run exactly from a block's "
                                      "input; training without cache_frozen_blocks", stacklevel=2)
                        records = None
                        continue
                    checked = True
                    for i, r in zip(idx, recs):
                        records[i] = r
    finally:
        model.train(was_training)
    return (r0, r1, records) if record_block else (r0, r1)


def _split_block_inputs(batch, captured: list, items: list[dict]) -> list[dict]:
    """Per pair, the recorded inputs of the lowest adapted block (unpadded, CPU), from the
    one (concatenated layout) or two (shared prompt: prompts, then responses) tensors one
    `pair_logps` call recorded."""
    keep = lambda h: h.detach().cpu().clone()  # noqa: E731  (a slice would pin the batch)
    out = []
    if "prompt_input_ids" in batch:
        prompts, responses = captured
        P = prompts.shape[1]
        for i, it in enumerate(items):
            prompt = keep(prompts[i, P - len(it["prompt_ids_1"]):])
            out.append({"block_input_prompt_1": prompt, "block_input_prompt_0": prompt,
                        "block_input_response_1": keep(responses[2 * i, :len(it["response_ids_1"])]),
                        "block_input_response_0": keep(responses[2 * i + 1, :len(it["response_ids_0"])])})
        return out
    (seqs,) = captured
    for i, it in enumerate(items):
        rec = {}
        for j, row in ((1, i), (0, len(items) + i)):
            n_p, n_r = len(it[f"prompt_ids_{j}"]), len(it[f"response_ids_{j}"])
            rec[f"block_input_prompt_{j}"] = keep(seqs[row, :n_p])
            rec[f"block_input_response_{j}"] = keep(seqs[row, n_p:n_p + n_r])
        out.append(rec)
    return out


def _runs_from_block(model, block: int, collate, items, recs, lp1, lp0, atol: float = 1e-3) -> bool:
    """Whether `model` run `from_block(block)` on the recorded inputs gives the log-probs
    `lp1`, `lp0` of the full forward (shape (B,)) for this batch."""
    device = lp1.device
    batch = {k: v.to(device) for k, v in collate([{**it, **r} for it, r in zip(items, recs)]).items()}
    with from_block(model, block):
        c1, c0 = pair_logps(model, batch)
    return bool(max((c1 - lp1).abs().max(), (c0 - lp0).abs().max()) <= atol)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _cached_reference_logps(model, tokenizer, pairs, config, features, tokens_digest, out: Path,
                            record_block: int = 0):
    """Reference log-probs from the pairs' columns, the output dir's cache, or computed (and
    cached). With `record_block` (`cache_frozen_blocks`) the reference pass always runs, for
    the block inputs it records (they are not kept on disk: a resumed run records them
    again), but given or cached log-probs still win, so a resumed run trains on the values
    it started with. Returns (ref_logp_0, ref_logp_1, block inputs or None, seconds spent
    computing)."""
    known = None
    if "ref_logp_0" in pairs.columns and "ref_logp_1" in pairs.columns:
        r0 = pairs["ref_logp_0"].to_numpy(np.float64)
        r1 = pairs["ref_logp_1"].to_numpy(np.float64)
        if np.all(np.isfinite(r0)) and np.all(np.isfinite(r1)):
            known = (r0, r1)
    key = f"{tokens_digest}:{_model_fingerprint(model)}"
    cache = out / REF_CACHE_FILE
    if known is None and cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                known = (z["ref_logp_0"], z["ref_logp_1"])
    if known is not None and not record_block:
        return *known, None, 0.0
    t0 = time.perf_counter()
    r0, r1, *blocks = reference_logps(model, tokenizer, pairs, config, features=features,
                                      record_block=record_block)
    seconds = time.perf_counter() - t0
    if known is not None:
        return *known, blocks[0], seconds
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), ref_logp_0=r0, ref_logp_1=r1)
    return r0, r1, (blocks[0] if blocks else None), seconds


# ---------------------------------------------------------------------------------------
# top level

# Weight files a Trainer checkpoint holds (one of them): full weights, sharded or not, or a PEFT adapter.
_CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def _checkpoint_dirs(out: Path) -> list[Path]:
    """Every `checkpoint-<step>` folder in `out`, complete or not, by step."""
    cps = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(cps, key=lambda p: int(p.name.split("-")[-1]))


def _checkpoint_complete(cp: Path) -> bool:
    """Whether a Trainer checkpoint was written to the end.

    `Trainer._save_checkpoint` (transformers 5.x) writes the weights first, then optimizer,
    scheduler, scaler and RNG states, and `trainer_state.json` last (with a plain, non-atomic
    write). So a checkpoint is complete when trainer_state.json parses and records this
    folder's step, and the weights are there; a kill during the save leaves no (or a
    truncated) trainer_state.json.
    """
    try:
        state = json.loads((cp / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != int(cp.name.split("-")[-1]):
        return False
    if any((cp / name).is_file() for name in _CHECKPOINT_WEIGHTS):
        return True
    # FSDP sharded weights, or adapters saved in sub-folders (several adapters): as the Trainer accepts
    return any(sub.is_dir() and (sub.name.startswith("pytorch_model_fsdp")
                                 or any((sub / n).is_file() for n in _CHECKPOINT_WEIGHTS[4:]))
               for sub in cp.iterdir())


def _checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints in `out` (`_checkpoint_complete`), by step: what a run may resume from."""
    return [cp for cp in _checkpoint_dirs(out) if _checkpoint_complete(cp)]


def _drop_incomplete_checkpoints(out: Path) -> None:
    """Delete, with a warning, the checkpoints a killed save left half-written: resuming from
    one fails ("Can't find a valid checkpoint"), and the Trainer's rotation would count them."""
    for cp in _checkpoint_dirs(out):
        if not _checkpoint_complete(cp):
            warnings.warn(f"{cp}: incomplete checkpoint (a save was interrupted); removing it and "
                          "resuming from the last complete one", stacklevel=3)
            shutil.rmtree(cp, ignore_errors=True)  # another rank of a distributed run may race us


def train_preferences(model, tokenizer, pairs: pd.DataFrame, config: PreferenceConfig | None = None,
                      resume: bool = True, metadata: dict | None = None,
                      callbacks: list | None = None) -> TrainResult:
    """Train `model` on preference pairs with the soft-label DPO loss (DESIGN.md §3).

    Parameters
    ----------
    model : transformers causal LM
        The reference policy π_ref, as given; it is also the starting point of training.
        With LoRA it is wrapped in place (`peft.get_peft_model`), so afterwards it is no
        longer the reference: use `with result.model.disable_adapter():` for π_ref.
    tokenizer : transformers tokenizer
    pairs : pandas.DataFrame, n rows
        Columns `prompt`, `response_0`, `response_1`, `label` (p = P(y1 preferred), in
        [0, 1]); optional `ref_logp_0`, `ref_logp_1` (precomputed log π_ref, then used as is).
    config : PreferenceConfig, optional
    resume : bool or "auto"
        If `config.output_dir` holds checkpoints of the same run (same data, settings and
        tokenization), resume from the last one; if it holds the finished run, load it and
        train nothing. False: start over (old checkpoints and caches there are deleted).
        "auto": resume the same run, start over when the folder holds another one (the
        pipelines: changed pairs or settings make the old training stale).
    metadata : dict, optional
        Written into the model card and `dualign_train.json`: e.g. `lambda`, `margins`,
        `data`, `scores`, `base_model`, `method`, `dual`.
    callbacks : list of transformers.TrainerCallback, optional

    Returns
    -------
    TrainResult

    Raises
    ------
    InputError
        Bad pairs table or settings, or `output_dir` holds checkpoints of a different run
        while `resume=True`.
    ValueError
        `resume` is not True, False or "auto".
    """
    from transformers import set_seed

    config = config or PreferenceConfig()
    if config.use_lora and hasattr(model, "peft_config"):
        raise InputError("the model already carries a PEFT adapter: merge it first "
                         "(model.merge_and_unload()) or set use_lora=False to train that adapter")
    metadata = dict(metadata or {})
    if not metadata.get("base_model"):
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        if name:
            metadata["base_model"] = str(name)
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', not {resume!r}")
    pairs = validate_pairs(pairs)
    out = Path(config.output_dir)

    feats = tokenize_pairs(tokenizer, pairs, config)
    p = pairs["label"].to_numpy(np.float64)
    labels = hard_labels(p, config.seed) if config.label_mode == "hard" else p
    offsets = pairs["offset"].to_numpy(np.float64) if "offset" in pairs.columns else None
    tdig = _tokens_digest(feats)
    # offsets join the digest only when present, so runs without them keep their old digests
    data_digest = array_digest(labels) if offsets is None else array_digest(labels, offsets)
    run_digest = array_digest(np.frombuffer(
        f"{tdig}:{data_digest}:{config.training_digest()}".encode(), dtype=np.uint8))

    prev = _read_json(out / RUN_FILE)
    has_state = bool(_checkpoints(out)) or (out / MODEL_DIRNAME).exists()
    other_run = has_state and prev is not None and prev.get("run_digest") != run_digest
    if resume == "auto":
        resume = not other_run
    elif resume and other_run:
        raise InputError("holds a run with other data or settings; choose another output_dir "
                         "or pass resume=False to start over", file=str(out))
    if not resume and out.exists():
        for cp in _checkpoint_dirs(out):
            shutil.rmtree(cp)
        for name in (RESULT_FILE, REF_CACHE_FILE, RUN_FILE):
            (out / name).unlink(missing_ok=True)
        if (out / MODEL_DIRNAME).exists():
            shutil.rmtree(out / MODEL_DIRNAME)
    done = _read_json(out / RESULT_FILE)
    if resume and done is not None and done.get("run_digest") == run_digest \
            and (out / MODEL_DIRNAME).exists():
        return _finished_result(model, tokenizer, out, done, labels)

    out.mkdir(parents=True, exist_ok=True)
    write_json({"run_digest": run_digest, "config": config.to_dict()}, out / RUN_FILE)

    # Reference log-probs before any adapter exists: the model as given *is* π_ref.
    block = _first_adapted_block(model, config.lora_last_layers) if config.cache_frozen_blocks else 0
    ref0, ref1, block_inputs, ref_seconds = _cached_reference_logps(model, tokenizer, pairs, config, feats,
                                                                    tdig, out, record_block=block)
    if block_inputs is not None:  # train from the frozen blocks' output (`cache_frozen_blocks`)
        feats = [{**f, **b} for f, b in zip(feats, block_inputs)]
    else:
        block = 0

    set_seed(config.seed)  # LoRA init draws from the global RNG
    if config.use_lora:
        model = _add_lora(model, config)
    pad_id = _pad_id(tokenizer)

    Trainer = preference_trainer_class()
    args = config.training_arguments()
    trainer = Trainer(model=model, args=args,
                      train_dataset=PreferenceDataset(feats, labels, ref0, ref1, offsets),
                      data_collator=PreferenceCollator(
                          pad_id, share_prompt=_can_share_prompt(config, args) and _supports_shared_prompt(model)),
                      processing_class=tokenizer,
                      callbacks=callbacks, beta=config.beta, sft_weight=config.sft_weight,
                      frozen_blocks=block)
    trainer.group_by_length = config.group_by_length
    if config.use_lora and config.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed LoRA needs grads flowing into inputs

    if resume:
        _drop_incomplete_checkpoints(out)
    cps = _checkpoints(out) if resume else []
    resumed_from = str(cps[-1]) if cps else None
    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resumed_from)
    runtime = time.perf_counter() - t0

    model = trainer.model
    model.eval()
    model_dir = out / MODEL_DIRNAME
    result = TrainResult(model=model, tokenizer=tokenizer, model_dir=model_dir, output_dir=out,
                         global_step=int(trainer.state.global_step),
                         train_loss=float(output.training_loss), train_runtime=runtime,
                         ref_seconds=ref_seconds, ref_logp_0=np.asarray(ref0),
                         ref_logp_1=np.asarray(ref1), labels=np.asarray(labels),
                         log_history=list(trainer.state.log_history), resumed_from=resumed_from)
    result.model = save_trained(model, tokenizer, model_dir, config, metadata, result, pairs)
    write_json({"run_digest": run_digest, **result.summary()}, out / RESULT_FILE)
    return result


def _can_share_prompt(config: PreferenceConfig, args) -> bool:
    """The shared-prompt layout needs a key/value cache (none under gradient checkpointing)
    and runs two forward passes per step, which is verified single-process only; DDP,
    DeepSpeed and FSDP get the one-pass concatenated layout."""
    distributed = args.world_size > 1 or bool(args.deepspeed) or bool(args.fsdp)
    return config.share_prompt and not config.gradient_checkpointing and not distributed


def _supports_shared_prompt(model) -> bool:
    """Whether the model's forward takes what the shared-prompt layout passes (a cache with
    batch repetition, position ids, `logits_to_keep`); otherwise the concatenated layout."""
    params = forward_params(model)
    has_cache_arg = "cache" in params or "past_key_values" in params
    return has_cache_arg and {"position_ids", "logits_to_keep", "use_cache"} <= params


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def lora_config(model, config):
    """peft's `LoraConfig` from a settings object with `lora_r`, `lora_alpha`, `lora_dropout`,
    `lora_target_modules` and `lora_last_layers` (PreferenceConfig, PrimalDualConfig): with
    `lora_last_layers` N > 0, only the target modules of the last N blocks of `model`."""
    from peft import LoraConfig

    tm = config.lora_target_modules
    tm = list(tm) if isinstance(tm, (list, tuple)) else tm
    if config.lora_last_layers:
        tm = _last_layer_modules(model, tm, config.lora_last_layers)
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=tm, bias="none", task_type="CAUSAL_LM")


def _add_lora(model, config: PreferenceConfig):
    from peft import get_peft_model

    with _quiet_peft():
        return get_peft_model(model, lora_config(model, config))


def _first_adapted_block(model, n_last: int) -> int:
    """Index of the lowest of the last `n_last` blocks (`lora_last_layers`; those below stay
    frozen). Raises InputError when the model has fewer blocks."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not n_layers or n_last > n_layers:
        raise InputError(f"the model has {n_layers} transformer blocks; cannot adapt the last {n_last}",
                         field="lora_last_layers")
    return n_layers - n_last


def _last_layer_modules(model, target_modules, n_last: int) -> list[str]:
    """Full names of the linear (or GPT-2 Conv1D) modules `target_modules` selects ("all-linear"
    or names their last component must equal) inside the last `n_last` transformer blocks (the
    block list `frozen_blocks.transformer_blocks` finds, the one `cache_frozen_blocks` cuts).

    Raises InputError when the model has fewer blocks, no block list, or no such module there."""
    import torch
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    first = _first_adapted_block(model, n_last)
    try:
        owner, attr = transformer_blocks(model)
    except ValueError as e:
        raise InputError(str(e), field="lora_last_layers") from None
    adapted = {id(m) for block in getattr(owner, attr)[first:] for m in block.modules()}
    names = [name for name, module in model.named_modules()
             if id(module) in adapted and isinstance(module, (torch.nn.Linear, Conv1D))
             and (target_modules == "all-linear" or name.split(".")[-1] in target_modules)]
    if not names:
        raise InputError(f"no module matching {target_modules!r} in the last {n_last} blocks",
                         field="lora_target_modules")
    return names


@contextlib.contextmanager
def _quiet_peft():
    """peft reads transformers' deprecated `is_gradient_checkpointing` on every wrap; its
    FutureWarning says nothing to our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _finished_result(model, tokenizer, out: Path, done: dict, labels) -> TrainResult:
    """The result of a run that already finished in `out` (its saved model, loaded)."""
    model_dir = out / MODEL_DIRNAME
    trained, _ = load_trained(model_dir, base_model=model)
    r0 = r1 = np.full(len(labels), np.nan)
    cache = out / REF_CACHE_FILE
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            r0, r1 = z["ref_logp_0"], z["ref_logp_1"]
    info = _read_json(model_dir / "dualign_train.json") or {}
    return TrainResult(model=trained, tokenizer=tokenizer, model_dir=model_dir, output_dir=out,
                       global_step=int(done.get("global_step", 0)),
                       train_loss=float(done.get("train_loss", math.nan)), train_runtime=0.0,
                       ref_seconds=0.0, ref_logp_0=r0, ref_logp_1=r1, labels=np.asarray(labels),
                       log_history=info.get("log_history", []), resumed_from=None, skipped=True)


# ---------------------------------------------------------------------------------------
# saving and loading

def save_trained(model, tokenizer, model_dir: Path, config: PreferenceConfig, metadata: dict,
                 result: TrainResult, pairs: pd.DataFrame | None = None):
    """Write the trained model (adapter or merged safetensors), tokenizer, model card and
    `dualign_train.json` into `model_dir` (atomically: a temp dir renamed at the end).

    Returns
    -------
    The model to use from now on (the merged model when `save_format="merged"`).
    """
    model_dir = Path(model_dir)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    is_peft = hasattr(model, "peft_config")
    if is_peft and config.save_format == "merged":
        model = model.merge_and_unload()
        is_peft = False
    # safetensors only (transformers 5 and peft write nothing else by default; be explicit)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {"config": config.to_dict(), "metadata": metadata, "result": result.summary(),
            "format": "peft-adapter" if is_peft else "full", "log_history": result.log_history}
    write_json(info, tmp / "dualign_train.json")
    write_text(model_card(config, metadata, result, is_peft, pairs), tmp / "README.md")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)
    return model


def model_card(config: PreferenceConfig, metadata: dict, result: TrainResult, is_peft: bool,
               pairs: pd.DataFrame | None = None) -> str:
    """A model card (README.md) recording how the model was aligned: β, λ*, margins, data,
    scores, training settings and outcome."""
    md = dict(metadata)
    base = md.pop("base_model", None)
    method = md.pop("method", "preference (soft-label DPO)")
    lines = ["---"]
    if base:
        lines.append(f"base_model: {json.dumps(str(base))}")
    lines += [f"library_name: {'peft' if is_peft else 'transformers'}",
              "tags: [dualign, safety-alignment, dpo, can]", "---", "",
              f"# {method} — trained with dualign", "",
              "Aligned once with the pseudo-preference (soft-label DPO) loss of CAN "
              "(Huang et al., NeurIPS 2024, arXiv 2405.19544): the target policy is "
              "π ∝ π_ref · exp((r + λᵀg)/β).", "",
              "| setting | value |", "|---|---|",
              f"| base model | {base if base else 'n/a'} |",
              f"| β | {config.beta} |"]
    for key, label in (("lambda", "λ*"), ("margins", "margins"), ("data", "data"),
                       ("scores", "scores")):
        if key in md:
            lines.append(f"| {label} | {_cell(md.pop(key))} |")
    n = len(result.labels)
    lines += [f"| label mode | {config.label_mode} |",
              f"| pairs | {n} (mean label {float(np.mean(result.labels)):.3f}) |",
              "| adapter | " + (f"LoRA r={config.lora_r} α={config.lora_alpha}, {_cell(config.lora_target_modules)}"
                                if config.use_lora else "none (full fine-tune)") + " |",
              f"| saved as | {'PEFT adapter' if is_peft else 'full safetensors weights'} |",
              f"| optimizer steps | {result.global_step} |",
              f"| learning rate | {config.learning_rate} |",
              f"| batch | {config.per_device_train_batch_size} × {config.gradient_accumulation_steps} accumulation |",
              f"| final mean loss | {result.train_loss:.4f} |", ""]
    if md:
        lines += ["## Other metadata", "", "```json", json.dumps(md, indent=2, default=str), "```", ""]
    lines += ["## Load", "", "```python", "from dualign.train import load_trained",
              "model, tokenizer = load_trained('<this folder>'"
              + (", base_model=<the base model or its id>)" if is_peft else ")"), "```", "",
              "Full settings: `dualign_train.json`.", ""]
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    return json.dumps(v, default=str) if not isinstance(v, str) else v


def load_trained(model_dir, base_model=None, merge: bool = False, torch_dtype=None):
    """Load a model saved by `train_preferences`, for sampling or scoring.

    Parameters
    ----------
    model_dir : str or Path
        `<output_dir>/model`.
    base_model : torch.nn.Module or str, optional
        For an adapter: the base model object, or a spec for `dualign.models.loading
        .load_policy` / a local HF directory. Default: the adapter's recorded base path.
        Ignored for full weights.
    merge : bool
        Merge the adapter into the base and return a plain model (faster generation).
    torch_dtype : torch.dtype, optional

    Returns
    -------
    model : the causal LM in eval mode (a `peft.PeftModel` unless merged or full weights)
    tokenizer : the tokenizer saved with it

    Raises
    ------
    InputError
        `model_dir` holds no saved model, or the adapter's base cannot be found.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel

        if base_model is None:
            base_model = json.loads((model_dir / "adapter_config.json").read_text()).get(
                "base_model_name_or_path")
        if isinstance(base_model, (str, Path)):
            base_model = _load_base(str(base_model), torch_dtype)
        if base_model is None:
            raise InputError("adapter without a known base model: pass base_model",
                             file=str(model_dir))
        if hasattr(base_model, "peft_config"):  # a wrapped model: use its base
            base_model = base_model.unload() if hasattr(base_model, "unload") else base_model.get_base_model()
        with _quiet_peft():
            model = PeftModel.from_pretrained(base_model, model_dir)
        if merge:
            model = model.merge_and_unload()
    elif (model_dir / "config.json").exists():
        kw = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, **kw)
    else:
        raise InputError("no saved model here (no adapter_config.json or config.json)",
                         file=str(model_dir))
    model.eval()
    return model, tokenizer


def _load_base(spec: str, torch_dtype=None):
    p = Path(spec)
    if p.is_dir() and (p / "config.json").exists():
        from transformers import AutoModelForCausalLM

        kw = {"dtype": torch_dtype} if torch_dtype is not None else {}
        return AutoModelForCausalLM.from_pretrained(p, use_safetensors=True, **kw)
    try:
        from ..models.loading import load_policy
    except ImportError as e:
        raise InputError(f"cannot load base model {spec!r}: {e}") from None
    return load_policy(spec)[0]
