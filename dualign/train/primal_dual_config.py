"""Settings of a primal–dual run (`train_primal_dual`): `PrimalDualConfig` (every field a YAML
key, validated on construction, mapped onto TRL's `GRPOConfig` on demand, with the digest of the
fields that decide the weights and λ), the per-constraint setting reader `_per_constraint`, and
the names of the files a run writes. Light to import: TRL and torch only when `grpo_config` runs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, settings_from_dict
from ..runio import digest

LOG_FILE = "primal_dual_log.jsonl"
STATE_FILE = "primal_dual_state.json"
RUN_FILE = "primal_dual_run.json"
RESULT_FILE = "primal_dual_result.json"
MODEL_DIRNAME = "model"


def _number(name: str, v, *, low=None, low_open=False, integer=False):
    """Check one scalar setting; raises InputError naming `name`."""
    ok_type = (isinstance(v, (int, np.integer)) if integer
               else isinstance(v, (int, float, np.integer, np.floating)))
    if isinstance(v, bool) or not ok_type or not math.isfinite(float(v)):
        kind = "an integer" if integer else "a finite number"
        raise InputError(f"must be {kind}, got {v!r}", field=name)
    if low is not None and (v <= low if low_open else v < low):
        raise InputError(f"must be {'>' if low_open else '>='} {low}, got {v!r}", field=name)


def _per_constraint(name: str, value, names: Sequence[str]) -> np.ndarray:
    """A setting given as one number, a list (one per constraint, in `names` order) or a
    mapping name → number, as an array of shape (m,). Raises InputError naming the field."""
    m = len(names)
    if isinstance(value, dict):
        missing = [n for n in names if n not in value]
        if missing:
            raise InputError(f"no value for constraint '{missing[0]}' (constraints: {', '.join(names)})",
                             field=f"{name}.{missing[0]}")
        extra = sorted(set(map(str, value)) - set(names))
        if extra:
            raise InputError(f"unknown constraint (constraints: {', '.join(names)})", field=f"{name}.{extra[0]}")
        values = [value[n] for n in names]
    elif isinstance(value, (list, tuple, np.ndarray)):
        values = list(np.asarray(value, dtype=object).reshape(-1))
        if len(values) != m:
            raise InputError(f"has {len(values)} values for {m} constraint(s) ({', '.join(names)})", field=name)
    else:
        values = [value] * m
    for n, v in zip(names, values):
        _number(f"{name}.{n}" if m > 1 else name, v)
    return np.asarray(values, dtype=np.float64)


@dataclass
class PrimalDualConfig:
    """Settings of one primal–dual (PPO-Lagrangian-style) run on GRPO; fields map 1:1 to YAML keys.

    Safe-RLHF's PPO-Lag defaults: λ_init 1, λ learning rate 0.1, λ_max 5, a window of 128
    episodes, and threshold 0 on the cost, i.e. `safety_target` 0 on safety = −cost.
    `safety_target`, `lambda_init` (and, per constraint, nothing else) take one number, a list
    in the order of the safety scorers, or a mapping constraint name → number.

    Raises
    ------
    InputError
        On construction, a value out of range or of the wrong type (the message names the field).
    """

    safety_target: Any = field(default=0.0, metadata={
        "help": "Target safety level t_j of each constraint E_π[g_j] ≥ t_j, absolute (MoCAN's constraint "
                "is t_j = E_ref[g_j] + margin_j; the pipeline computes it). Safe-RLHF's threshold 0 on the "
                "cost is 0 here."})
    lambda_init: Any = field(default=1.0, metadata={"help": "Initial multiplier(s) λ, ≥ 0."})
    lambda_lr: float = field(default=0.1, metadata={
        "help": "Step size η of the dual update λ ← clip(λ − η (ḡ_window − t), 0, λ_max)."})
    lambda_max: float = field(default=5.0, metadata={"help": "Upper clip of every λ_j (> 0)."})
    cost_window: int = field(default=128, metadata={
        "help": "Episodes (completions) whose mean safety score drives the dual update."})
    beta: float = field(default=0.1, metadata={
        "help": "KL coefficient β (GRPO's `beta`; the same β as MoCAN's dual and loss). > 0."})
    num_generations: int = field(default=4, metadata={
        "help": "Completions per prompt (GRPO's group; ≥ 2, the advantage is relative to the group)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens of a completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    template: str | None = field(default=None, metadata={
        "help": "Prompt template with a {prompt} slot; None: the tokenizer's chat template, else the PKU "
                "template (`dualign.models.text.format_prompt`, as sampling and training use)."})
    max_prompt_length: int = field(default=512, metadata={
        "help": "Keep at most this many prompt tokens (cut from the left; 0: no cut)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Policy learning rate (AdamW)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the prompts (if max_steps ≤ 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps (> 0 overrides num_train_epochs)."})
    stop_when_met: int = field(default=0, metadata={
        "help": "Stop once every constraint has been met (window mean ≥ target, the window full) for this "
                "many optimizer steps in a row; 0: run the whole step budget. What a compute comparison "
                "with a one-shot method needs: the loop's cost to reach the constraint, not its budget's."})
    per_device_train_batch_size: int = field(default=8, metadata={
        "help": "Completions per micro-batch (GRPO counts completions, not prompts); times "
                "gradient_accumulation_steps it must be a multiple of num_generations."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    num_iterations: int = field(default=1, metadata={
        "help": "Optimizer passes over each generation batch (GRPO's μ); λ is updated once per batch."})
    scale_rewards: str = field(default="none", metadata={
        "help": "GRPO's reward scaling: 'none' (default: rewards and β stay in the same units), 'group' or 'batch'."})
    loss_type: str = field(default="dapo", metadata={
        "help": "GRPO's loss aggregation; 'dapo' (default) or 'dr_grpo' weigh every token alike, which keeps "
                "the reward and the KL penalty in the sequence-level ratio of the objective."})
    warmup_steps: float = field(default=0.0, metadata={"help": "As in TrainingArguments."})
    weight_decay: float = field(default=0.0, metadata={"help": "As in TrainingArguments."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "As in TrainingArguments."})
    lr_scheduler_type: str = field(default="constant", metadata={
        "help": "As in TrainingArguments; constant by default, so a run resumed with more steps keeps "
                "the learning rate it had."})
    optim: str = field(default="adamw_torch", metadata={"help": "As in TrainingArguments."})
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (as PreferenceConfig)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: Any = field(default="all-linear", metadata={
        "help": "Module names, or 'all-linear' (every linear layer but the output head)."})
    lora_last_layers: int = field(default=0, metadata={
        "help": "Adapt only the last N transformer blocks (0: all), as PreferenceConfig."})
    seed: int = field(default=0, metadata={"help": "Seeds LoRA init, prompt order and sampling."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every this many optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    report_to: Any = field(default="none", metadata={"help": "As in TrainingArguments ('none', 'tensorboard', ...)."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (TRL's default would be on)."})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Activation checkpointing (TRL's default would be on)."})
    training_args: dict = field(default_factory=dict, metadata={
        "help": "Any other GRPOConfig field, passed through (these win over the above)."})

    # Fields that do not change the trained weights or λ: a resumed run may change them.
    # The step counts are here too: a run stopped at max_steps resumes with more.
    _NOT_IN_RUN_DIGEST = ("save_steps", "save_total_limit", "report_to", "max_steps", "num_train_epochs",
                          "stop_when_met")

    def __post_init__(self):
        if isinstance(self.safety_target, dict):
            for k, v in self.safety_target.items():
                _number(f"safety_target.{k}", v)
        elif isinstance(self.safety_target, (list, tuple)):
            for i, v in enumerate(self.safety_target):
                _number(f"safety_target[{i}]", v)
        else:
            _number("safety_target", self.safety_target)
        if isinstance(self.lambda_init, dict):
            for k, v in self.lambda_init.items():
                _number(f"lambda_init.{k}", v, low=0)
        elif isinstance(self.lambda_init, (list, tuple)):
            for i, v in enumerate(self.lambda_init):
                _number(f"lambda_init[{i}]", v, low=0)
        else:
            _number("lambda_init", self.lambda_init, low=0)
        _number("lambda_lr", self.lambda_lr, low=0, low_open=True)
        _number("lambda_max", self.lambda_max, low=0, low_open=True)
        init = np.asarray(list(self.lambda_init.values()) if isinstance(self.lambda_init, dict)
                          else self.lambda_init, dtype=np.float64)
        if np.any(init > self.lambda_max):
            raise InputError(f"must be <= lambda_max ({self.lambda_max}), got {self.lambda_init!r}",
                             field="lambda_init")
        for name in ("beta", "temperature", "learning_rate"):
            _number(name, getattr(self, name), low=0, low_open=True)
        _number("top_p", self.top_p, low=0, low_open=True)
        if self.top_p > 1:
            raise InputError(f"must be in (0, 1], got {self.top_p}", field="top_p")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "lora_dropout"):
            _number(name, getattr(self, name), low=0)
        for name in ("cost_window", "max_new_tokens", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "num_iterations", "lora_r", "lora_alpha", "save_steps"):
            _number(name, getattr(self, name), low=1, integer=True)
        for name in ("max_prompt_length", "lora_last_layers", "seed", "stop_when_met"):
            _number(name, getattr(self, name), low=0, integer=True)
        _number("num_generations", self.num_generations, low=2, integer=True)
        _number("max_steps", self.max_steps, integer=True)
        _number("num_train_epochs", self.num_train_epochs)
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise InputError("set max_steps > 0 or num_train_epochs > 0", field="num_train_epochs")
        if self.save_total_limit is not None:
            _number("save_total_limit", self.save_total_limit, low=1, integer=True)
        per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if per_step % self.num_generations:
            raise InputError(f"per_device_train_batch_size × gradient_accumulation_steps = {per_step} completions "
                             f"must be a multiple of num_generations ({self.num_generations}): GRPO's groups "
                             "cannot be split", field="per_device_train_batch_size")
        if self.scale_rewards not in ("none", "group", "batch"):
            raise InputError(f"must be 'none', 'group' or 'batch', not {self.scale_rewards!r}", field="scale_rewards")
        if self.loss_type not in ("dapo", "dr_grpo", "grpo", "bnpo"):
            raise InputError(f"must be 'dapo', 'dr_grpo', 'grpo' or 'bnpo', not {self.loss_type!r}",
                             field="loss_type")
        if not isinstance(self.training_args, dict):
            raise InputError(f"must be a mapping, got {type(self.training_args).__name__}", field="training_args")

    @classmethod
    def from_dict(cls, d: dict | None, section: str = "primal_dual") -> "PrimalDualConfig":
        """Build from a YAML mapping; an unknown key raises InputError naming `section.key`
        and the closest valid name."""
        return settings_from_dict(cls, d, section, "settings")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("lora_target_modules", "safety_target", "lambda_init"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    def grpo_config(self, output_dir, **overrides):
        """The `trl.GRPOConfig` of this run (`training_args`, then `overrides`, win).

        Logging is every step: the per-step KL comes from GRPO's logged metrics."""
        from trl import GRPOConfig

        kw = dict(
            output_dir=str(output_dir), learning_rate=self.learning_rate, num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm, lr_scheduler_type=self.lr_scheduler_type, optim=self.optim,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps, seed=self.seed,
            save_strategy="steps", save_steps=self.save_steps, save_total_limit=self.save_total_limit,
            logging_steps=1, report_to=self.report_to, bf16=self.bf16, fp16=self.fp16,
            activation_checkpointing=self.gradient_checkpointing, disable_tqdm=False,
            num_generations=self.num_generations, max_completion_length=self.max_new_tokens,
            temperature=self.temperature, top_p=self.top_p, beta=self.beta,
            num_iterations=self.num_iterations, scale_rewards=self.scale_rewards, loss_type=self.loss_type,
            remove_unused_columns=False, dataloader_num_workers=0, log_completions=False,
            dataloader_pin_memory=_cuda_available(),
        )
        kw.update(self.training_args)
        kw.update(overrides)
        return GRPOConfig(**kw)

    def run_digest(self, extra) -> str:
        """Digest of the settings that decide the weights and λ (not the step counts), with `extra`."""
        d = {k: v for k, v in self.to_dict().items() if k not in self._NOT_IN_RUN_DIGEST}
        return digest([d, extra])


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
