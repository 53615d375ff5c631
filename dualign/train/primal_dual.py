"""The Safe-RLHF-style primal–dual baseline (PPO-Lagrangian's loop) on TRL's `GRPOTrainer`.

CAN solves the dual of

    max_π E[r] − β KL(π ‖ π_ref)   s.t.   E_π[g_j] ≥ t_j,   t_j = E_ref[g_j] + margin_j

once, before training. Safe-RLHF instead alternates: a policy-gradient step on the shaped
reward r + λᵀg, then a projected dual-ascent step on λ from the constraint slack measured on
the policy's own recent episodes. This module is that loop, for comparison; its parts live in
`primal_dual_config` (settings, file names) and `lagrange` (the dual side), re-exported here so
`dualign.train.primal_dual` stays the import path:

- `lagrange_step`: λ ← clip(λ − η (ḡ_window − t), 0, λ_max), pure numpy.
- `LagrangeState`: λ, the window of the last `cost_window` episodes' safety scores (a deque),
  token counts and the per-step log; JSON round trip for checkpoints. `met_streak`: the steps
  in a row that met every constraint (`stop_when_met`).
- `ShapedReward`: GRPO's reward function. It scores each (prompt, completion) text pair with
  the project's scorers (`Scorer.reward`, `Scorer.safety`: signs as everywhere in dualign) and
  returns r + λᵀg with the current λ, exactly the reward MoCAN's π_λ tilts by.
- `PrimalDualCallback`: between optimizer steps, feeds the new episodes into the window and
  takes one `lagrange_step`; logs a row per step (λ, slack, reward, safety, KL from GRPO's
  metrics, token counts) to `primal_dual_log.jsonl`; saves the state into every checkpoint.
- `train_primal_dual` (this module): wires them into `GRPOTrainer` (LoRA through its
  `peft_config`), resumes from the last checkpoint of `out_dir` with λ and the window restored
  (only a run of the same base policy, prompts, scorers and settings), and saves the adapter
  atomically.

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

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..runio import check_output_dir, digest, write_json, write_text
# Re-exported: callers and tests import these names from `dualign.train.primal_dual`.
from .lagrange import LagrangeState, ShapedReward, _callback_class, lagrange_step, met_streak  # noqa: F401
from .primal_dual_config import (LOG_FILE, MODEL_DIRNAME, RESULT_FILE, RUN_FILE, STATE_FILE,  # noqa: F401
                                 PrimalDualConfig, _cuda_available, _number, _per_constraint)
from .saving import card_text, clear_outputs


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
        or load the finished run when `out_dir` holds it with the same base policy (every weight:
        `reference.weights_digest`), settings and step count.
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
        settings, or trained from another base policy (`reference.weights_digest`), while `resume=True`.
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
    # The base policy's weights, recorded beside the run digest rather than in it: a folder
    # written before they were recorded still resumes, and one recorded with another base is
    # another run (its adapter and λ belong to that base).
    from .reference import weights_digest

    base = weights_digest(policy)
    prev = _read_json(out / RUN_FILE)
    has_state = bool(_checkpoints(out)) or (out / MODEL_DIRNAME).exists()
    if resume and has_state and prev is not None and (prev.get("run_digest") != run_digest
                                                      or prev.get("base_weights", base) != base):
        raise InputError("holds a primal–dual run with another base policy, other prompts, scorers or settings; "
                         "choose another out_dir or pass resume=False to start over", file=str(out))
    if not resume and out.exists():
        _clear(out)
    done = _read_json(out / RESULT_FILE)
    if resume and done is not None and done.get("full_digest") == full_digest and (out / MODEL_DIRNAME).exists():
        return _finished_result(policy, out, done)

    out.mkdir(parents=True, exist_ok=True)
    write_json({"run_digest": run_digest, "base_weights": base, "config": config.to_dict(), "constraints": names,
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
    clear_outputs(out, _checkpoints(out), (RESULT_FILE, RUN_FILE, LOG_FILE))


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
    write_text(card_text("\n".join([
        "# Primal–dual baseline (Safe-RLHF-style Lagrangian on GRPO), trained with dualign", "",
        f"Shaped reward r + λᵀg, β = {config.beta}; λ by projected dual ascent (lr {config.lambda_lr}, "
        f"max {config.lambda_max}, window {config.cost_window} episodes) toward the safety targets "
        f"{json.dumps(dict(zip(state.names, state.targets.tolist())))}.", "",
        f"Final λ: {lam}. Steps: {result.global_step}. Generated tokens: {result.generated_tokens}; "
        f"trained tokens: {result.trained_tokens}.", "",
        "Per-step log: `primal_dual_log.jsonl` next to this folder. Full settings: `dualign_train.json`.", ""]),
        base_model=metadata.get("base_model"), is_peft=is_peft, tags=["grpo", "primal-dual"]), tmp / "README.md")
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
