"""Settings of a preference-training run: `PreferenceConfig` (every field a YAML key, validated
on construction, mapped onto `transformers.TrainingArguments` on demand) and the names of the
files a run writes into its output directory. Light to import: no torch or transformers until
`training_arguments` is called, so configs are checked where the language-model extras are absent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, settings_from_dict
from ..runio import digest

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
        """Digest (`runio.digest`) of the fields that determine the trained weights."""
        return digest(self._training_fields())

    def run_digest(self, extra: dict) -> str:
        """Digest naming one training run: the fields that determine the trained weights, with
        `extra`, what else does (`train_preferences` passes the pairs' token and label digests
        and the base model's `reference.weights_digest`, so a folder holding the run of another
        base, other pairs or other settings is told apart from this one)."""
        return digest([self._training_fields(), extra])

    def _training_fields(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self._NON_TRAINING}

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
