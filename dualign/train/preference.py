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
   card (README.md) and `dualign_train.json`; `load_trained` reads them back. Under a
   distributed launch rank 0 alone writes, after every rank has helped gather the weights.

A killed run resumes from its last checkpoint and ends with the same weights as an
uninterrupted one (same seed): checkpoints hold optimizer, scheduler and RNG states, and
the batch order depends only on (seed, epoch).

The code lives in modules this one imports and re-exports (the import path stays
`dualign.train.preference`): `preference_config` (settings, file names), `pairs_data`
(validation, tokenization, dataset, collator, sampler), `policy_logps` (log-probs of a batch),
`reference` (reference log-probs), `trainer` (`PreferenceTrainer`, imported on first use: it
needs transformers) and `saving` (`TrainResult`, save and load). This module keeps the top level:
`train_preferences`, the reference cache, checkpoints and resumption, the copy of the model
that training changes (the caller's stays π_ref) and the LoRA helpers: a little over 500 lines,
because when a run may resume, and from where, is decided here in one place.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..models.text import pad_id
from ..runio import array_digest, atomic_path, dist_info, write_json
from .frozen_blocks import transformer_blocks
from .losses import hard_labels
# Re-exported: callers and tests import these names from `dualign.train.preference`.
from .pairs_data import (PAIR_COLUMNS, EpochSeededLengthSampler, PreferenceCollator,  # noqa: F401
                         PreferenceDataset, _pad_states, _tokens_digest, tokenize_pairs, validate_pairs)
from .policy_logps import (_model_inputs, _shared_prompt_logps, _supports_shared_prompt,  # noqa: F401
                           label_weighted_nll, pair_logps, response_lengths)
from .preference_config import (MODEL_DIRNAME, REF_CACHE_FILE, RESULT_FILE, RUN_FILE,  # noqa: F401
                                PreferenceConfig, _cuda_available)
from .reference import (_model_fingerprint, _runs_from_block, _split_block_inputs,  # noqa: F401
                        reference_logps)
from .saving import (TrainResult, _cell, _load_base, _quiet_peft, clear_outputs, load_trained, model_card,  # noqa: F401
                     save_trained, save_trained_on_ranks)


def preference_trainer_class():
    """The `PreferenceTrainer` class (a `transformers.Trainer` subclass)."""
    # imported on first use: transformers is an optional dependency (the dual math installs without it)
    from .trainer import PreferenceTrainer

    return PreferenceTrainer


# ---------------------------------------------------------------------------------------
# reference log-probs, cached in the output directory

# `reference_logps` is looked up in this module's namespace when called, so a spy set on
# `dualign.train.preference.reference_logps` sees every reference pass of a training run.
def _cached_reference_logps(model, tokenizer, pairs, config, features, tokens_digest, out: Path,
                            record_block: int = 0, write: bool = True, model_id: str | None = None):
    """Reference log-probs from the pairs' columns, the output dir's cache, or computed (and
    cached). With `record_block` (`cache_frozen_blocks`) the reference pass always runs, for
    the block inputs it records (they are not kept on disk: a resumed run records them
    again), but given or cached log-probs still win, so a resumed run trains on the values
    it started with. `write=False` (ranks other than 0 of a launch) computes without writing
    the cache. `model_id`: `_model_fingerprint(model)` when the caller has it already (a full
    pass over the weights: seconds on a 7B model). Returns (ref_logp_0, ref_logp_1, block inputs
    or None, seconds spent computing)."""
    known = None
    if "ref_logp_0" in pairs.columns and "ref_logp_1" in pairs.columns:
        r0 = pairs["ref_logp_0"].to_numpy(np.float64)
        r1 = pairs["ref_logp_1"].to_numpy(np.float64)
        if np.all(np.isfinite(r0)) and np.all(np.isfinite(r1)):
            known = (r0, r1)
    key = f"{tokens_digest}:{model_id or _model_fingerprint(model)}"
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
    if not write:
        return r0, r1, (blocks[0] if blocks else None), seconds
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
            shutil.rmtree(cp, ignore_errors=True)


def train_preferences(model, tokenizer, pairs: pd.DataFrame, config: PreferenceConfig | None = None,
                      resume: bool = True, metadata: dict | None = None,
                      callbacks: list | None = None) -> TrainResult:
    """Train `model` on preference pairs with the soft-label DPO loss (docs/design.md §3).

    Under a distributed launch (torchrun, `accelerate launch`) every rank calls it with its
    own copy of the model: the HF Trainer runs data-parallel (DDP: per-device batch b on W
    ranks trains on the same pairs, step by step, as one process with batch W·b), rank 0
    alone clears, caches and writes (`save_trained_on_ranks` gathers sharded weights on
    every rank first), and every rank returns the same result once the files are on disk.
    The shared-prompt layout runs in one process only; `cache_frozen_blocks` under DDP and
    in one process only (FSDP, DeepSpeed: off, with a warning).

    Parameters
    ----------
    model : transformers causal LM
        The reference policy π_ref, as given; it is also the starting point of training, and
        it stays π_ref: the training changes a copy (`_training_copy`), returned as
        `result.model`. With LoRA the copy is structural and costs no weights: new module
        objects sharing every parameter and buffer tensor with `model` (peft wraps the copy
        and marks those shared weights `requires_grad=False`, the adapter's frozen base).
        Without LoRA the copy holds its own trainable parameters: one model copy in memory
        when, as usual, all of them train. Merging the returned adapter in place
        (`result.model.merge_and_unload()`) would write into the shared weights, i.e. into
        `model`; `save_format="merged"` does not (the merged layers get their own weights).
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

    from ..parallel import process_group

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
    data_digest = array_digest(labels) if offsets is None else array_digest(labels, offsets)
    # the base model's weights are part of what a run is: the same pairs and settings on another
    # base must not resume the old run
    base_id = _model_fingerprint(model)  # once: the run's identity and the reference cache's key
    run_digest = config.run_digest({"tokens": tdig, "data": data_digest, "base": base_id})

    # Built before anything touches `out`: under a launch (torchrun, accelerate launch) the
    # arguments set up the ranks' process group (accelerate's), or join the caller's, and the
    # decisions and writes below go through it.
    args = config.training_arguments(**_cpu_launch(config))
    engine = _sharded_engine(args)
    # ZeRO-0/1/2 keep whole weights on every rank; FSDP, ZeRO-3 (or an unknown stage) may not
    if engine in ("FSDP", "DeepSpeed ZeRO-3", "DeepSpeed") and config.use_lora and config.save_format == "merged":
        raise InputError(f"under {engine} the weights are sharded over the ranks and the adapter cannot be "
                         "merged into them; use save_format='adapter' and merge afterwards "
                         "(load_trained(..., merge=True))", field="save_format")
    with process_group() as group:
        # Rank 0 reads the folder and decides for all: ranks that looked for themselves could
        # see it while rank 0 clears it, and go different ways (one waiting for the others forever).
        action, resume, done = group.broadcast(_resume_plan(out, run_digest, resume) if group.rank == 0 else None)
        if action == "other run":
            raise InputError("holds a run with other data, settings or base model; choose another output_dir "
                             "or pass resume=False to start over", file=str(out))
        if action == "finished":
            return _finished_result(model, tokenizer, out, done, labels)
        if group.rank == 0:
            if resume:
                _drop_incomplete_checkpoints(out)
            else:
                _clear_run(out)
            out.mkdir(parents=True, exist_ok=True)
            write_json({"run_digest": run_digest, "config": config.to_dict()}, out / RUN_FILE)
        group.barrier()  # the folder cleared before any rank reads its reference cache or checkpoints

        # Reference log-probs before any adapter exists: the model as given *is* π_ref. Every
        # rank computes them (each needs them, and the recorded block inputs); rank 0 caches.
        block = _first_adapted_block(model, config.lora_last_layers) if config.cache_frozen_blocks else 0
        if block and engine:  # module swapping inside FSDP / DeepSpeed wrappers: never run
            if group.rank == 0:
                warnings.warn(f"cache_frozen_blocks is verified under DDP and one process only; training "
                              f"without it under {engine}", stacklevel=2)
            block = 0
        ref0, ref1, block_inputs, ref_seconds = _cached_reference_logps(
            model, tokenizer, pairs, config, feats, tdig, out, record_block=block, write=group.rank == 0,
            model_id=base_id)
        if block_inputs is not None:  # train from the frozen blocks' output (`cache_frozen_blocks`)
            feats = [{**f, **b} for f, b in zip(feats, block_inputs)]
        else:
            block = 0

        set_seed(config.seed)  # LoRA init draws from the global RNG
        model = _training_copy(model, config.use_lora)  # the caller's model stays π_ref
        if config.use_lora:
            model = _add_lora(model, config)
        pad = pad_id(tokenizer)

        share = _can_share_prompt(config, args) and _supports_shared_prompt(model)
        if config.share_prompt and not share and group.rank == 0 and _launched(args):
            warnings.warn("share_prompt is verified in one process only; under a distributed launch each "
                          "step runs the concatenated layout (same loss, prompts run twice)", stacklevel=2)
        Trainer = preference_trainer_class()
        trainer = Trainer(model=model, args=args,
                          train_dataset=PreferenceDataset(feats, labels, ref0, ref1, offsets),
                          data_collator=PreferenceCollator(pad, share_prompt=share),
                          processing_class=tokenizer,
                          callbacks=callbacks, beta=config.beta, sft_weight=config.sft_weight,
                          frozen_blocks=block)
        trainer.group_by_length = config.group_by_length
        if config.use_lora and config.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed LoRA needs grads flowing into inputs

        # the checkpoint rank 0 sees (a rank that listed for itself could see a newer one appear)
        cps = _checkpoints(out) if resume else []
        resumed_from = group.broadcast(str(cps[-1]) if cps else None)
        t0 = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=resumed_from)
        runtime = time.perf_counter() - t0

        # What every rank returns is rank 0's record: the final loss averages only the steps
        # since the last log on each rank, and the timings are each rank's own.
        loss, runtime, ref_seconds, history = group.broadcast(
            (float(output.training_loss), runtime, ref_seconds, list(trainer.state.log_history)))
        model_dir = out / MODEL_DIRNAME
        if hasattr(model, "peft_config") and config.save_format == "merged":
            _unshare_adapted_weights(model)  # the merge must not write into the caller's π_ref
        result = TrainResult(model=trainer.model, tokenizer=tokenizer, model_dir=model_dir, output_dir=out,
                             global_step=int(trainer.state.global_step),
                             train_loss=loss, train_runtime=runtime,
                             ref_seconds=ref_seconds, ref_logp_0=np.asarray(ref0),
                             ref_logp_1=np.asarray(ref1), labels=np.asarray(labels),
                             log_history=history, resumed_from=resumed_from)
        # every rank takes part (sharded weights are gathered); rank 0 writes, then all wait for it
        result.model = save_trained_on_ranks(trainer, tokenizer, model_dir, config, metadata, result, pairs,
                                             group)
        if group.rank == 0:
            write_json({"run_digest": run_digest, **result.summary()}, out / RESULT_FILE)
        group.barrier()  # no rank returns before the finished run is on disk (a pipeline reads it next)
        return result


def _resume_plan(out: Path, run_digest: str, resume) -> tuple[str, bool, dict | None]:
    """What a run with `run_digest` does with the folder `out` (read only).

    Returns
    -------
    (action, resume, done)
        action: "finished" (the same run finished there: load it, `done` is its result
        record), "other run" (checkpoints or a model of another run, and `resume=True`: an
        error) or "train"; resume: whether to resume from checkpoints (False: clear first);
        `resume="auto"` resolved.
    """
    prev = _read_json(out / RUN_FILE)
    has_state = bool(_checkpoints(out)) or (out / MODEL_DIRNAME).exists()
    other_run = has_state and prev is not None and prev.get("run_digest") != run_digest
    if resume == "auto":
        resume = not other_run
    elif resume and other_run:
        return "other run", True, None
    if resume:
        done = _read_json(out / RESULT_FILE)
        if done is not None and done.get("run_digest") == run_digest and (out / MODEL_DIRNAME).exists():
            return "finished", True, done
    return "train", bool(resume), None


def _clear_run(out: Path) -> None:
    """Delete what an earlier run left in `out`: checkpoints, result, reference cache, run record, model."""
    if out.exists():
        clear_outputs(out, _checkpoint_dirs(out), (RESULT_FILE, REF_CACHE_FILE, RUN_FILE))


def _cpu_launch(config: PreferenceConfig) -> dict:
    """`use_cpu=True` under a distributed launch on a machine without CUDA (unless the settings
    say otherwise): without it accelerate finds no GPU backend and runs every rank as a
    separate one-process training on all the data (no DDP, no sharded batches)."""
    if dist_info().world_size > 1 and "use_cpu" not in config.training_args and not _cuda_available():
        return {"use_cpu": True}
    return {}


def _launched(args) -> bool:
    """Whether training runs under a distributed launch or a sharding engine."""
    return args.world_size > 1 or _sharded_engine(args) is not None


def _sharded_engine(args) -> str | None:
    """The engine that wraps the model beyond DDP, from the arguments or from `accelerate
    launch`'s environment: "FSDP", "DeepSpeed ZeRO-3" (weights sharded over the ranks),
    "DeepSpeed ZeRO-2" (optimizer states and gradients sharded), or None (one process or DDP)."""
    env = lambda k: os.environ.get(k, "false").lower() in ("1", "true", "yes")  # noqa: E731
    if getattr(args, "fsdp", None) or env("ACCELERATE_USE_FSDP"):
        return "FSDP"
    ds = getattr(args, "deepspeed", None)
    if not (ds or env("ACCELERATE_USE_DEEPSPEED")):
        return None
    # the plugin the arguments built (from their config or accelerate's environment) knows the stage
    plugin = getattr(args, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None) or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return f"DeepSpeed ZeRO-{stage}" if str(stage) in ("0", "1", "2", "3") else "DeepSpeed"


def _can_share_prompt(config: PreferenceConfig, args) -> bool:
    """The shared-prompt layout needs a key/value cache (none under gradient checkpointing)
    and runs two forward passes per step, which is verified single-process only; DDP,
    DeepSpeed and FSDP get the one-pass concatenated layout."""
    return config.share_prompt and not config.gradient_checkpointing and not _launched(args)



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


def _training_copy(model, lora: bool):
    """The model training changes, made from the caller's `model` (π_ref), which stays as it is.

    A deep copy of the module tree in which the tensors that training leaves alone are not
    copied but shared: with LoRA every parameter and buffer (the adapter is added to the copy,
    so the frozen weights sit in memory once), without it the parameters that do not require
    grad and the buffers. Forward hooks registered on `model` come along to the copy."""
    import copy

    shared = [p for p in model.parameters() if lora or not p.requires_grad] + list(model.buffers())
    return copy.deepcopy(model, memo={id(t): t for t in shared})


def _unshare_adapted_weights(model) -> None:
    """Give every LoRA layer's base layer its own weight tensor, so that merging the adapter
    (which adds B·A to it in place) leaves the weights shared with π_ref (`_training_copy`)
    untouched; costs one copy of the adapted layers' weights, the merged model's own."""
    import torch

    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if hasattr(module, "lora_A") and isinstance(getattr(base, "weight", None), torch.nn.Parameter):
            base.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)


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



def _finished_result(model, tokenizer, out: Path, done: dict, labels) -> TrainResult:
    """The result of a run that already finished in `out` (its saved model, loaded; an adapter
    onto a structural copy of `model`, which stays π_ref)."""
    model_dir = out / MODEL_DIRNAME
    trained, _ = load_trained(model_dir, base_model=_training_copy(model, lora=True))
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
