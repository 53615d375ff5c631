"""The Safe-RLHF-style primal–dual baseline (PPO-Lagrangian's loop) on TRL's `GRPOTrainer`.

CAN solves the dual of

    max_π E[r] − β KL(π ‖ π_ref)   s.t.   E_π[g_j] ≥ t_j,   t_j = E_ref[g_j] + margin_j

once, before training. Safe-RLHF instead alternates: a policy-gradient step on the shaped
reward r + λᵀg, then a projected dual-ascent step on λ from the constraint slack measured on
the policy's own recent episodes. This module is that loop, for comparison:

- `lagrange_step`: λ ← clip(λ − η (ḡ_window − t), 0, λ_max), pure numpy.
- `LagrangeState`: λ, the window of the last `cost_window` episodes' safety scores (a deque),
  token counts and the per-step log; JSON round trip for checkpoints.
- `ShapedReward`: GRPO's reward function. It scores each (prompt, completion) text pair with
  the project's scorers (`Scorer.reward`, `Scorer.safety`: signs as everywhere in dualign) and
  returns r + λᵀg with the current λ, exactly the reward MoCAN's π_λ tilts by.
- `PrimalDualCallback`: between optimizer steps, feeds the new episodes into the window and
  takes one `lagrange_step`; logs a row per step (λ, slack, reward, safety, KL from GRPO's
  metrics, token counts) to `primal_dual_log.jsonl`; saves the state into every checkpoint.
- `train_primal_dual`: wires them into `GRPOTrainer` (LoRA through its `peft_config`),
  resumes from the last checkpoint of `out_dir` with λ and the window restored, and saves the
  adapter atomically.

Where it departs from Safe-RLHF's PPO-Lag, and why:

- GRPO, not PPO (TRL has no PPO): the advantage is the reward minus its mean over the
  `num_generations` completions of a prompt, no value network.
- The shaped reward is r + λᵀg, not (r − λc)/(1 + λ): with β the same coefficient as MoCAN's,
  the stationary policy of the KL-regularized objective is then π_λ ∝ π_ref exp((r + λᵀg)/β),
  the same family the dual picks λ* in. Dividing by 1 + λ would change the effective β with λ.
- Rewards are not divided by their group's standard deviation (`scale_rewards="none"`) and the
  loss is token-summed over the batch (`loss_type="dapo"`): both keep the reward and the KL
  penalty in the same units, so β means what it means in the dual. (GRPO's KL is the per-token
  k3 estimate against π_ref, as TRL computes it.)
- λ is updated once per generation batch (every optimizer step with the defaults), after the
  batch's rewards were shaped with the previous λ; Safe-RLHF updates it just before its step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, settings_from_dict
from ..runio import atomic_path, check_output_dir, digest, write_json, write_text

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


# ---------------------------------------------------------------------------------------
# the dual update

def met_streak(rows: Sequence[dict], cost_window: int) -> int:
    """How many of the last log rows (`PrimalDualCallback`'s, oldest first) in a row have every
    constraint met: a full window (`window_size` ≥ `cost_window`) whose mean reaches each target
    (every `slack` ≥ 0). 0 when the last row misses. Recomputed from the log, so a resumed run
    counts the steps before its interruption."""
    n = 0
    for r in reversed(rows):
        slack = r.get("slack") or {}
        if r.get("window_size", 0) < cost_window or not slack or \
                any(v is None or v < 0 for v in slack.values()):
            break
        n += 1
    return n


def lagrange_step(lam, window_safety_means, targets, lr: float, lam_max) -> np.ndarray:
    """One projected dual-ascent step on the constraint slack.

        λ ← clip(λ − lr · (ḡ − t), 0, λ_max)

    λ rises while a constraint is violated (ḡ < t) and falls toward 0 while it is slack.
    (On the dual function D of the design doc, ḡ − t estimates ∇D(λ), so this is projected
    gradient descent on D: it converges to λ* for lr small next to β / Var(g).)

    Parameters
    ----------
    lam : float or array_like, shape (m,)
        Current multipliers, each in [0, λ_max].
    window_safety_means : float or array_like, shape (m,)
        ḡ_j: mean safety score (higher = safer) of the recent episodes.
    targets : float or array_like, shape (m,)
        t_j: the level each constraint asks for, E_π[g_j] ≥ t_j.
    lr : float
        Step size, > 0.
    lam_max : float or array_like, shape (m,)
        Upper clip, > 0.

    Returns
    -------
    numpy.ndarray, shape (m,) (m = 1 for scalar inputs), float64.

    Raises
    ------
    ValueError
        Shapes that do not broadcast to (m,), a non-finite value, lr ≤ 0 or λ_max ≤ 0.
    """
    lam = np.atleast_1d(np.asarray(lam, dtype=np.float64))
    g = np.atleast_1d(np.asarray(window_safety_means, dtype=np.float64))
    t = np.atleast_1d(np.asarray(targets, dtype=np.float64))
    top = np.atleast_1d(np.asarray(lam_max, dtype=np.float64))
    if lam.ndim != 1 or any(a.ndim != 1 or len(a) not in (1, len(lam)) for a in (g, t, top)):
        raise ValueError(f"shapes do not match λ's ({lam.shape}): means {g.shape}, targets {t.shape}, "
                         f"lam_max {top.shape}")
    for name, a in (("lam", lam), ("window_safety_means", g), ("targets", t), ("lam_max", top)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite, got {a}")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr}")
    if np.any(top <= 0):
        raise ValueError(f"lam_max must be > 0, got {top}")
    return np.clip(lam - lr * (g - t), 0.0, top)


class LagrangeState:
    """λ, the episode window, token counts and the per-step log of one run.

    Attributes
    ----------
    names : list of str, length m
        Constraint names (the safety scorers' keys).
    lam : numpy.ndarray, shape (m,)
        The multipliers that shape the next rewards.
    targets : numpy.ndarray, shape (m,)
    window : collections.deque of numpy.ndarray (m,), maxlen `cost_window`
        Safety scores of the most recent episodes (one completion each), oldest first.
    generated_tokens, trained_tokens : int
        Totals over the run (over resumptions too). Generated: completion tokens sampled.
        Trained: prompt + completion tokens of every sequence in a training forward/backward
        pass (unpadded; each of GRPO's `num_iterations` passes counts; the no-grad reference
        and old-policy passes do not).
    history : list of dict
        One row per optimizer step (`PrimalDualCallback`).
    pending : dict of lists
        Episodes scored since the last dual update (the reward function fills it).
    """

    def __init__(self, names, lam, targets, cost_window: int):
        self.names = list(names)
        self.lam = np.asarray(lam, dtype=np.float64).reshape(len(self.names)).copy()
        self.targets = np.asarray(targets, dtype=np.float64).reshape(len(self.names)).copy()
        self.window: deque = deque(maxlen=int(cost_window))
        self.generated_tokens = 0
        self.trained_tokens = 0
        self.history: list[dict] = []
        self.pending = self._empty_pending()

    @staticmethod
    def _empty_pending() -> dict:
        return {"reward": [], "safety": [], "shaped": [], "generated_tokens": 0, "trained_tokens": 0}

    def record(self, reward, safety, shaped, generated_tokens: int, trained_tokens: int) -> None:
        """Add a scored batch of episodes: reward, shaped (n,), safety (n, m), token counts."""
        p = self.pending
        p["reward"].extend(np.asarray(reward, dtype=np.float64).tolist())
        p["shaped"].extend(np.asarray(shaped, dtype=np.float64).tolist())
        p["safety"].extend(np.asarray(safety, dtype=np.float64).reshape(-1, len(self.names)).tolist())
        p["generated_tokens"] += int(generated_tokens)
        p["trained_tokens"] += int(trained_tokens)

    def window_means(self) -> np.ndarray:
        """Mean safety of the episodes in the window, shape (m,) (NaN when empty)."""
        if not self.window:
            return np.full(len(self.names), np.nan)
        return np.mean(np.stack(list(self.window)), axis=0)

    def update(self, lr: float, lam_max: float, pending: dict | None = None) -> dict | None:
        """Move the pending episodes into the window and take one `lagrange_step`.

        Returns the step's facts (λ before and after, slack, batch means, token counts), or
        None when no episode arrived since the last update (λ is then left as it is: the
        window has not changed, and stepping on the same evidence twice would double count it).
        """
        p = self.pending if pending is None else pending
        self.pending = self._empty_pending()
        if not p["reward"]:
            return None
        safety = np.asarray(p["safety"], dtype=np.float64).reshape(-1, len(self.names))
        for row in safety:
            self.window.append(row)
        means = self.window_means()
        before = self.lam.copy()
        self.lam = lagrange_step(before, means, self.targets, lr, lam_max)
        self.generated_tokens += p["generated_tokens"]
        self.trained_tokens += p["trained_tokens"]
        return {"lambda_used": before, "lambda": self.lam.copy(), "window_safety": means,
                "slack": means - self.targets, "window_size": len(self.window),
                "episodes": len(p["reward"]), "reward": float(np.mean(p["reward"])),
                "shaped_reward": float(np.mean(p["shaped"])), "safety": safety.mean(axis=0),
                "generated_tokens": p["generated_tokens"], "trained_tokens": p["trained_tokens"]}

    def to_dict(self) -> dict:
        return {"names": self.names, "lambda": self.lam.tolist(), "targets": self.targets.tolist(),
                "cost_window": self.window.maxlen, "window": [w.tolist() for w in self.window],
                "generated_tokens": self.generated_tokens, "trained_tokens": self.trained_tokens,
                "history": self.history}

    @classmethod
    def from_dict(cls, d: dict) -> "LagrangeState":
        s = cls(d["names"], d["lambda"], d["targets"], d["cost_window"])
        for w in d["window"]:
            s.window.append(np.asarray(w, dtype=np.float64))
        s.generated_tokens, s.trained_tokens = int(d["generated_tokens"]), int(d["trained_tokens"])
        s.history = list(d["history"])
        return s

    def lambda_history(self) -> np.ndarray:
        """λ after every step of the log, shape (steps, m)."""
        return np.asarray([[r["lambda"][n] for n in self.names] for r in self.history],
                          dtype=np.float64).reshape(-1, len(self.names))


# ---------------------------------------------------------------------------------------
# the reward GRPO sees

class ShapedReward:
    """GRPO reward function r + λᵀg of (prompt, completion) text pairs, λ read from `state`.

    Called by `GRPOTrainer` as `f(prompts=..., completions=..., completion_ids=..., **columns)`
    with the dataset's `n_prompt_tokens` column among the extra keyword arguments. Scores go
    through the project's scorers (`reward_scorer.reward`, `safety_scorers[name].safety`) on
    the raw user prompt and the decoded completion, as the score stage scores samples.
    """

    __name__ = "primal_dual_reward"  # the name TRL logs the reward under

    def __init__(self, state: LagrangeState, reward_scorer, safety_scorers: dict, num_iterations: int = 1):
        self.state = state
        self.reward_scorer = reward_scorer
        self.safety_scorers = dict(safety_scorers)
        self.num_iterations = int(num_iterations)

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Reward (n,) and safety (n, m) of each pair, oriented (higher = better, safer)."""
        r = np.asarray(self.reward_scorer.reward(list(prompts), list(completions)), dtype=np.float64)
        g = np.stack([np.asarray(self.safety_scorers[n].safety(list(prompts), list(completions)), dtype=np.float64)
                      for n in self.state.names], axis=1)
        return r, g

    def __call__(self, prompts, completions, completion_ids=None, n_prompt_tokens=None, log_metric=None, **_):
        r, g = self.scores(prompts, completions)
        lam = self.state.lam
        shaped = r + g @ lam
        generated = sum(len(c) for c in completion_ids) if completion_ids is not None else 0
        prompt_tokens = sum(int(n) for n in n_prompt_tokens) if n_prompt_tokens is not None else 0
        self.state.record(r, g, shaped, generated, self.num_iterations * (prompt_tokens + generated))
        if log_metric is not None:  # into TRL's own log, averaged per logging step
            log_metric("primal_dual/reward", float(r.mean()))
            for j, n in enumerate(self.state.names):
                log_metric(f"primal_dual/safety/{n}", float(g[:, j].mean()))
                log_metric(f"primal_dual/lambda/{n}", float(lam[j]))
        return shaped.tolist()


# ---------------------------------------------------------------------------------------
# the callback: dual updates, the log, checkpoints

def _callback_class():
    from transformers import TrainerCallback

    class PrimalDualCallback(TrainerCallback):
        """Takes the dual step after each optimizer step, logs it, and saves λ with checkpoints.

        One log row per optimizer step (constraint-keyed values are dicts name → float):
        `step`; `lambda_used` (the λ that shaped this step's rewards) and `lambda` (after the
        dual step); `window_safety` (mean of the window), `slack` (= window_safety − target,
        < 0: violated), `target`, `window_size`; this step's episodes: `episodes`, mean raw
        `reward`, mean `safety`, mean `shaped_reward` (what GRPO's "reward" log shows); token
        counts `generated_tokens`, `trained_tokens` and their running totals (`LagrangeState`);
        from GRPO's log of the step: `kl` (mean per-token KL to π_ref), `loss`, `entropy`,
        `completion_length`, `learning_rate`. A step without new episodes (`num_iterations` > 1)
        has `episodes` 0, None for the batch means, and λ unchanged.

        Parameters
        ----------
        state : LagrangeState
        lambda_lr, lambda_max : float
        log_path : pathlib.Path
            Where the per-step rows are written (JSON Lines, rewritten atomically).
        """

        def __init__(self, state: LagrangeState, lambda_lr: float, lambda_max: float, log_path: Path,
                     stop_when_met: int = 0):
            self.state, self.lr, self.lam_max, self.log_path = state, lambda_lr, lambda_max, Path(log_path)
            self.stop_when_met = stop_when_met

        def on_step_end(self, args, state, control, **kwargs):
            from accelerate.utils import gather_object

            # every process holds its own completions' scores; all take the same step on all of them
            p = self.state.pending
            episodes = gather_object([(r, g, s) for r, g, s in zip(p["reward"], p["safety"], p["shaped"])])
            tokens = gather_object([(p["generated_tokens"], p["trained_tokens"])])
            merged = {"reward": [e[0] for e in episodes], "safety": [e[1] for e in episodes],
                      "shaped": [e[2] for e in episodes], "generated_tokens": sum(t[0] for t in tokens),
                      "trained_tokens": sum(t[1] for t in tokens)}
            facts = self.state.update(self.lr, self.lam_max, merged)
            names = self.state.names
            # constraint-keyed, and JSON-safe (an empty window's NaN mean becomes None)
            per = lambda a: None if a is None else {n: float(v) if np.isfinite(v) else None  # noqa: E731
                                                    for n, v in zip(names, a)}
            if facts is None:  # a step on an earlier generation batch (num_iterations > 1): λ stays
                lam, means = self.state.lam, self.state.window_means()
                facts = {"lambda": lam, "lambda_used": lam, "window_safety": means, "slack": means - self.state.targets,
                         "window_size": len(self.state.window), "reward": None, "safety": None,
                         "shaped_reward": None, "episodes": 0, "generated_tokens": 0, "trained_tokens": 0}
            self.state.history.append({
                "step": int(state.global_step), "lambda": per(facts["lambda"]),
                "lambda_used": per(facts["lambda_used"]), "slack": per(facts["slack"]),
                "window_safety": per(facts["window_safety"]), "window_size": facts["window_size"],
                "target": per(self.state.targets), "reward": facts["reward"], "safety": per(facts["safety"]),
                "shaped_reward": facts["shaped_reward"], "episodes": facts["episodes"],
                "generated_tokens": facts["generated_tokens"], "trained_tokens": facts["trained_tokens"],
                "generated_tokens_total": self.state.generated_tokens,
                "trained_tokens_total": self.state.trained_tokens, "kl": None})
            # every rank holds the same log rows (the dual step runs on the gathered episodes)
            streak = met_streak(self.state.history, self.state.window.maxlen)
            self.state.history[-1]["met_streak"] = streak
            if self.stop_when_met and streak >= self.stop_when_met:
                control.should_training_stop = True
                control.should_save = True  # the stopping step is a checkpoint a rerun finds finished

        def on_log(self, args, state, control, logs=None, **kwargs):
            rows = self.state.history
            if not logs or "train_runtime" in logs or not rows or rows[-1]["step"] != state.global_step:
                return
            # GRPO's metrics of this step (logging_steps = 1): KL to π_ref, loss, entropy, length
            for key, name in (("kl", "kl"), ("loss", "loss"), ("entropy", "entropy"),
                              ("completions/mean_length", "completion_length"), ("learning_rate", "learning_rate")):
                if logs.get(key) is not None:
                    rows[-1][name] = float(logs[key])
            if state.is_world_process_zero:
                self.write_log()

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            cp = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if cp.is_dir():  # what a resumed run restores λ, the window and the log from
                write_json(self.state.to_dict(), cp / STATE_FILE)
            self.write_log()

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.write_log()

        def write_log(self) -> None:
            with atomic_path(self.log_path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.state.history))

    return PrimalDualCallback


def _trainer_class():
    try:
        from trl import GRPOTrainer
    except ImportError as e:
        raise ImportError(f"the primal–dual baseline needs TRL (pip install 'dualign[trl]'): {e}") from None
    from trl.trainer.utils import RepeatSampler

    if not hasattr(GRPOTrainer, "_tokenize_prompts"):  # the one internal hook used below
        import trl

        raise ImportError(f"trl {trl.__version__}: GRPOTrainer has no _tokenize_prompts; dualign's primal–dual "
                          "baseline is written against trl 1.16 (see constraints.txt)")

    class PrimalDualGRPOTrainer(GRPOTrainer):
        """`GRPOTrainer` whose prompts are tokenized as everywhere in dualign
        (`dualign.models.text.encode_prompt`: template or chat template, BOS once), from token
        ids computed once per prompt, rather than by TRL's own templating."""

        def __init__(self, *args, prompt_ids: dict[str, list[int]], **kwargs):
            self._dualign_prompt_ids = prompt_ids
            super().__init__(*args, **kwargs)

        def _tokenize_prompts(self, prompts: list):
            return [list(self._dualign_prompt_ids[p]) for p in prompts], None, {}

        def _get_train_sampler(self, dataset=None):
            # TRL's sampler, arguments as TRL passes them, but resumable (see below)
            return EpochSeededRepeatSampler(
                data_source=self.train_dataset if dataset is None else dataset,
                mini_repeat_count=self.num_generations,
                batch_size=self.args.generation_batch_size // self.num_generations,
                repeat_count=self.num_iterations * self.args.steps_per_generation,
                shuffle=self.shuffle_dataset, seed=self.args.seed)

    class EpochSeededRepeatSampler(RepeatSampler):
        """TRL's `RepeatSampler` with the prompt order of epoch e drawn from (seed, e) alone
        (`Trainer` calls `set_epoch`): TRL's draws each epoch's order from one generator that a
        resumed run recreates, so after a resume it would replay the first epoch's order."""

        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __iter__(self):
            if self.shuffle:
                self.generator.manual_seed((self.seed or 0) * 1_000_003 + self.epoch)
            return super().__iter__()

    return PrimalDualGRPOTrainer


# ---------------------------------------------------------------------------------------
# top level

@dataclass
class PrimalDualResult:
    """What `train_primal_dual` returns.

    Attributes
    ----------
    model : torch.nn.Module
        The trained policy in eval mode (a `peft.PeftModel` with LoRA: `with
        model.disable_adapter():` gives back π_ref).
    names : list of str
        Constraint names, the order of λ's entries.
    lambda_history : numpy.ndarray, shape (steps, m)
        λ after every optimizer step (it moves once per generation batch: every step unless
        `num_iterations` > 1).
    final_lambda : dict of str to float
    log_path : pathlib.Path
        `<out_dir>/primal_dual_log.jsonl`, one JSON row per step.
    model_dir : pathlib.Path
        `<out_dir>/model` (adapter or full weights, safetensors; `dualign.train.load_trained` reads it).
    wall_s : float
        Seconds this call spent (0 when the finished run was only loaded).
    generated_tokens, trained_tokens : int
        Totals over the run (see `LagrangeState`).
    global_step : int
    resumed_from : str or None
    skipped : bool
        True when `out_dir` already held this finished run (nothing trained).
    """

    model: Any
    names: list
    lambda_history: np.ndarray
    final_lambda: dict
    log_path: Path
    model_dir: Path
    wall_s: float
    generated_tokens: int
    trained_tokens: int
    global_step: int = 0
    resumed_from: str | None = None
    skipped: bool = False

    def summary(self) -> dict:
        """JSON-able summary (no model)."""
        return {"names": self.names, "final_lambda": self.final_lambda, "log_path": str(self.log_path),
                "model_dir": str(self.model_dir), "wall_s": self.wall_s,
                "generated_tokens": self.generated_tokens, "trained_tokens": self.trained_tokens,
                "global_step": self.global_step, "resumed_from": self.resumed_from,
                "lambda_history": self.lambda_history.tolist()}


def _checkpoints(out: Path) -> list[Path]:
    cps = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(cps, key=lambda p: int(p.name.split("-")[-1]))


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _check_scorers(reward_scorer, safety_scorers) -> tuple[Any, dict]:
    """Scorer objects (spec strings and callables loaded with `load_scorer`); every safety
    scorer must declare a sign, checked before any model trains."""
    from ..models.scorers import Scorer, load_scorer

    as_scorer = lambda s: s if isinstance(s, Scorer) else load_scorer(s)  # noqa: E731
    if reward_scorer is None:
        raise InputError("a reward scorer is needed", field="reward_scorer")
    if not isinstance(safety_scorers, dict) or not safety_scorers:
        raise InputError("give at least one safety scorer, as a mapping name → scorer", field="safety_scorers")
    reward_scorer = as_scorer(reward_scorer)
    out = {}
    for name, s in safety_scorers.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"constraint names must be non-empty strings, got {name!r}", field="safety_scorers")
        s = as_scorer(s)
        if s.kind not in ("safety", "cost", "harm"):
            raise InputError(f"scorer {s.name!r} declares no safety sign (kind {s.kind!r}): prefix its spec "
                             "with 'safety:', 'cost:' or 'harm:'", field=f"safety_scorers.{name}")
        out[name] = s
    return reward_scorer, out


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise InputError("prompts must be a list of strings", field="prompts")
    if not prompts:
        raise InputError("no prompts to train on", field="prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise InputError("expected a non-empty prompt", record=i, field="prompt")
    return list(prompts)


def _prompt_ids(tokenizer, prompts: list[str], config: PrimalDualConfig) -> dict[str, list[int]]:
    from ..models.text import encode_prompt

    out = {}
    for p in dict.fromkeys(prompts):
        ids = encode_prompt(tokenizer, p, config.template)
        if config.max_prompt_length and len(ids) > config.max_prompt_length:
            ids = ids[-config.max_prompt_length:]  # keep the end: the answer follows it
        out[p] = ids
    return out


def _peft_config(model, config: PrimalDualConfig):
    from .preference import lora_config

    return lora_config(model, config)


def train_primal_dual(policy, tokenizer, prompts: list[str], reward_scorer, safety_scorers: dict,
                      config: PrimalDualConfig | None = None, out_dir=None, resume: bool = True,
                      metadata: dict | None = None, callbacks: list | None = None) -> PrimalDualResult:
    """Safe-RLHF's primal–dual loop on GRPO: policy steps on r + λᵀg, dual steps on λ.

    Parameters
    ----------
    policy : transformers causal LM
        π_ref as given, also the starting point. With LoRA it is wrapped in place (TRL's
        `get_peft_model`), like `train_preferences` does; the adapter disabled is π_ref.
        Full fine-tune (`use_lora=False`): TRL reloads π_ref from `policy.config._name_or_path`,
        so the policy must be as it was loaded from there.
    tokenizer : transformers tokenizer
    prompts : list of str, n ≥ 1
        Raw user prompts (formatted with `config.template` / the chat template here).
    reward_scorer : Scorer (or a `load_scorer` spec)
        Its `reward(prompts, responses)` is r.
    safety_scorers : dict of str to Scorer (or spec), m ≥ 1
        Their `safety(...)` (higher = safer; cost models negated) are g_j, in this order.
    config : PrimalDualConfig, optional
    out_dir : str or Path
        Checkpoints, the per-step log, `model/`, `primal_dual_result.json`.
    resume : bool
        True: resume from the last checkpoint of `out_dir` that holds λ (`primal_dual_state.json`),
        or load the finished run when `out_dir` holds it with the same settings and step count.
        False: start over (checkpoints, log, model and result there are deleted first).
    metadata : dict, optional
        Recorded in `model/dualign_train.json` (e.g. base_model, the margins behind the targets).
    callbacks : list of transformers.TrainerCallback, optional

    Returns
    -------
    PrimalDualResult

    Raises
    ------
    InputError
        Bad prompts, scorers or settings (naming the field); a policy that already carries a
        PEFT adapter with `use_lora`; a full fine-tune with β > 0 of a policy TRL cannot
        reload its reference from; `out_dir` holding a run with other prompts, scorers or
        settings while `resume=True`.
    """
    config = config or PrimalDualConfig()
    if resume not in (True, False):
        raise ValueError(f"resume must be True or False, not {resume!r}")
    if out_dir is None:
        raise InputError("an output directory is needed", field="out_dir")
    out = check_output_dir(out_dir)
    prompts = _check_prompts(prompts)
    reward_scorer, safety_scorers = _check_scorers(reward_scorer, safety_scorers)
    names = list(safety_scorers)
    targets = _per_constraint("safety_target", config.safety_target, names)
    lam0 = _per_constraint("lambda_init", config.lambda_init, names)
    if config.use_lora and hasattr(policy, "peft_config"):
        raise InputError("the policy already carries a PEFT adapter: merge it first "
                         "(model.merge_and_unload()) or set use_lora=False")
    if not config.use_lora and config.beta > 0 and not getattr(policy.config, "_name_or_path", ""):
        # TRL builds the frozen reference of a full fine-tune by reloading the policy from its path
        raise InputError("a full fine-tune with beta > 0 needs a policy loaded from a directory or hub id "
                         "(TRL reloads the reference from it); this one has none: use use_lora=True",
                         field="use_lora")
    metadata = dict(metadata or {})
    if not metadata.get("base_model") and getattr(policy.config, "_name_or_path", ""):
        metadata["base_model"] = str(policy.config._name_or_path)

    t0 = time.perf_counter()
    scorer_ids = {"reward": reward_scorer.name, **{n: s.name for n, s in safety_scorers.items()}}
    run_digest = config.run_digest({"prompts": digest(prompts), "scorers": scorer_ids,
                                    "targets": targets.tolist(), "lambda_init": lam0.tolist()})
    full_digest = digest([run_digest, config.max_steps, config.num_train_epochs])
    prev = _read_json(out / RUN_FILE)
    has_state = bool(_checkpoints(out)) or (out / MODEL_DIRNAME).exists()
    if resume and has_state and prev is not None and prev.get("run_digest") != run_digest:
        raise InputError("holds a primal–dual run with other prompts, scorers or settings; choose another "
                         "out_dir or pass resume=False to start over", file=str(out))
    if not resume and out.exists():
        _clear(out)
    done = _read_json(out / RESULT_FILE)
    if resume and done is not None and done.get("full_digest") == full_digest and (out / MODEL_DIRNAME).exists():
        return _finished_result(policy, out, done)

    out.mkdir(parents=True, exist_ok=True)
    write_json({"run_digest": run_digest, "config": config.to_dict(), "constraints": names,
                "targets": targets.tolist(), "scorers": scorer_ids}, out / RUN_FILE)

    state, resumed_from = LagrangeState(names, lam0, targets, config.cost_window), None
    if resume:
        usable = [cp for cp in _checkpoints(out) if (cp / STATE_FILE).exists()]
        if usable:
            state, resumed_from = LagrangeState.from_dict(json.loads((usable[-1] / STATE_FILE).read_text())), usable[-1]
        # a checkpoint without λ (killed between the two writes) cannot be resumed consistently
        last = int(usable[-1].name.split("-")[-1]) if usable else -1
        for cp in _checkpoints(out):
            if int(cp.name.split("-")[-1]) > last:
                shutil.rmtree(cp)
    log_path = out / LOG_FILE

    import datasets

    prompt_ids = _prompt_ids(tokenizer, prompts, config)
    dataset = datasets.Dataset.from_dict({"prompt": prompts,
                                          "n_prompt_tokens": [len(prompt_ids[p]) for p in prompts]})
    reward_fn = ShapedReward(state, reward_scorer, safety_scorers, config.num_iterations)
    cb = _callback_class()(state, config.lambda_lr, config.lambda_max, log_path, config.stop_when_met)
    peft_config = _peft_config(policy, config) if config.use_lora else None
    Trainer = _trainer_class()
    from .preference import _quiet_peft

    with _quiet_peft():
        trainer = Trainer(model=policy, reward_funcs=[reward_fn], args=config.grpo_config(out),
                          train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[cb, *(callbacks or [])], peft_config=peft_config,
                          prompt_ids=prompt_ids)
        trainer.train(resume_from_checkpoint=str(resumed_from) if resumed_from else None)
    cb.write_log()

    model = trainer.model
    model.eval()
    wall = time.perf_counter() - t0
    result = PrimalDualResult(model=model, names=names, lambda_history=state.lambda_history(),
                              final_lambda={n: float(v) for n, v in zip(names, state.lam)}, log_path=log_path,
                              model_dir=out / MODEL_DIRNAME, wall_s=wall, generated_tokens=state.generated_tokens,
                              trained_tokens=state.trained_tokens, global_step=int(trainer.state.global_step),
                              resumed_from=str(resumed_from) if resumed_from else None)
    _save_final(model, tokenizer, result.model_dir, config, metadata, result, state)
    write_json({"full_digest": full_digest, **result.summary()}, out / RESULT_FILE)
    return result


def _clear(out: Path) -> None:
    for cp in _checkpoints(out):
        shutil.rmtree(cp)
    for name in (RESULT_FILE, RUN_FILE, LOG_FILE):
        (out / name).unlink(missing_ok=True)
    if (out / MODEL_DIRNAME).exists():
        shutil.rmtree(out / MODEL_DIRNAME)


def _save_final(model, tokenizer, model_dir: Path, config: PrimalDualConfig, metadata: dict,
                result: PrimalDualResult, state: LagrangeState) -> None:
    """The trained model (LoRA adapter or full weights, safetensors), tokenizer, a model card
    and `dualign_train.json`, written into a temp dir renamed onto `model_dir` at the end (as
    `preference.save_trained` does)."""
    model_dir = Path(model_dir)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    is_peft = hasattr(model, "peft_config")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {"method": "primal-dual (PPO-Lag style, on GRPO)", "config": config.to_dict(), "metadata": metadata,
            "result": result.summary(), "targets": dict(zip(state.names, state.targets.tolist())),
            "format": "peft-adapter" if is_peft else "full"}
    write_json(info, tmp / "dualign_train.json")
    lam = ", ".join(f"{n} = {v:.4f}" for n, v in result.final_lambda.items())
    write_text("\n".join([
        "---", *([f"base_model: {json.dumps(str(metadata['base_model']))}"] if metadata.get("base_model") else []),
        f"library_name: {'peft' if is_peft else 'transformers'}",
        "tags: [dualign, safety-alignment, grpo, primal-dual]",
        "---", "", "# Primal–dual baseline (Safe-RLHF-style Lagrangian on GRPO), trained with dualign", "",
        f"Shaped reward r + λᵀg, β = {config.beta}; λ by projected dual ascent (lr {config.lambda_lr}, "
        f"max {config.lambda_max}, window {config.cost_window} episodes) toward the safety targets "
        f"{json.dumps(dict(zip(state.names, state.targets.tolist())))}.", "",
        f"Final λ: {lam}. Steps: {result.global_step}. Generated tokens: {result.generated_tokens}; "
        f"trained tokens: {result.trained_tokens}.", "",
        "Per-step log: `primal_dual_log.jsonl` next to this folder. Full settings: `dualign_train.json`.", ""]),
        tmp / "README.md")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)


def _finished_result(policy, out: Path, done: dict) -> PrimalDualResult:
    """The result of a run that already finished in `out` (its saved model, loaded)."""
    from .preference import load_trained

    model_dir = out / MODEL_DIRNAME
    model, _ = load_trained(model_dir, base_model=policy)
    names = list(done["names"])
    return PrimalDualResult(model=model, names=names,
                            lambda_history=np.asarray(done["lambda_history"], dtype=np.float64).reshape(-1, len(names)),
                            final_lambda=dict(done["final_lambda"]), log_path=out / LOG_FILE, model_dir=model_dir,
                            wall_s=0.0, generated_tokens=int(done["generated_tokens"]),
                            trained_tokens=int(done["trained_tokens"]), global_step=int(done["global_step"]),
                            resumed_from=None, skipped=True)
