"""What a preference-training run hands back and leaves on disk: `TrainResult`, `save_trained`
(PEFT adapter or merged/full safetensors weights, the tokenizer, a model card and
`dualign_train.json`, written atomically), `save_trained_on_ranks` (the same after training,
on every rank of a distributed launch: rank 0 writes), `model_card`, and `load_trained`, which reads a saved
model back (an adapter onto its base, optionally merged). `_quiet_peft` silences a peft warning
that says nothing to our users; LoRA wrapping uses it too.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..runio import write_json, write_text
from .preference_config import MODEL_DIRNAME, PreferenceConfig


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


@contextlib.contextmanager
def _quiet_peft():
    """peft reads transformers' deprecated `is_gradient_checkpointing` on every wrap; its
    FutureWarning says nothing to our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def save_trained(model, tokenizer, model_dir: Path, config: PreferenceConfig, metadata: dict,
                 result: TrainResult, pairs: pd.DataFrame | None = None, state_dict: dict | None = None):
    """Write the trained model (adapter or merged safetensors), tokenizer, model card and
    `dualign_train.json` into `model_dir` (atomically: a temp dir renamed at the end).

    One process writes; under a distributed launch `save_trained_on_ranks` calls this on
    rank 0 only.

    Parameters
    ----------
    state_dict : dict, optional
        The weights to write, when the model's own parameters are not them (sharded by
        ZeRO-3 or FSDP: the full state dict gathered from the ranks). Default: the model's.
        Ignored with `save_format="merged"` (the merged model's own weights are written).

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
        is_peft, state_dict = False, None
    kw = {"state_dict": state_dict} if state_dict is not None else {}
    # safetensors only (transformers 5 and peft write nothing else by default; be explicit)
    model.save_pretrained(tmp, safe_serialization=True, **kw)
    tokenizer.save_pretrained(tmp)
    info = {"config": config.to_dict(), "metadata": metadata, "result": result.summary(),
            "format": "peft-adapter" if is_peft else "full", "log_history": result.log_history}
    write_json(info, tmp / "dualign_train.json")
    write_text(model_card(config, metadata, result, is_peft, pairs), tmp / "README.md")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)
    return model


def save_trained_on_ranks(trainer, tokenizer, model_dir: Path, config: PreferenceConfig, metadata: dict,
                          result: TrainResult, pairs: pd.DataFrame | None, group):
    """`save_trained` after `trainer.train()`, in one process or on every rank of a launch.

    Every rank calls it. Each takes part in building the state dict where the engine
    needs that (ZeRO-3 and FSDP gather the sharded weights: a collective), only rank 0
    writes `model_dir`, and every rank waits for it (a barrier) before returning, so no
    rank reads a half-written model. With `save_format="merged"` every rank merges its own
    copy of the adapter (DDP keeps the copies equal); the caller refuses "merged" where the
    weights are sharded.

    Parameters
    ----------
    trainer : transformers.Trainer
        After training; `trainer.model_wrapped` is what its accelerator prepared (DDP,
        FSDP, a DeepSpeed engine, or the model itself in one process).
    group : dualign.parallel.Group
        The ranks of this run (`process_group()`); world size 1 in one process.
    tokenizer, model_dir, config, metadata, result, pairs : as `save_trained`

    Returns
    -------
    The trained model in eval mode, unwrapped (the same on every rank under DDP): the
    merged model with `save_format="merged"`.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    if hasattr(model, "peft_config") and config.save_format == "merged":
        model, state_dict = model.merge_and_unload(), None
        model.eval()
    else:
        # a collective under ZeRO-3 / FSDP (FSDP gives rank 0 the full dict, the others an
        # empty one); under DDP and in one process the model's own state dict, nothing copied
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if group.rank == 0:
        save_trained(model, tokenizer, model_dir, config, metadata, result, pairs, state_dict=state_dict)
    group.barrier()
    return model


def model_card(config: PreferenceConfig, metadata: dict, result: TrainResult, is_peft: bool,
               pairs: pd.DataFrame | None = None) -> str:
    """A model card (README.md) recording how the model was aligned: β, λ*, margins, data,
    scores, training settings and outcome."""
    md = dict(metadata)
    base = md.pop("base_model", None)
    method = md.pop("method", "preference (soft-label DPO)")
    lines = [f"# {method} — trained with dualign", "",
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
    return card_text("\n".join(lines), base_model=base, is_peft=is_peft, tags=["dpo", "can"])


def clear_outputs(out: Path, checkpoints, files) -> None:
    """Delete what an earlier training run left in `out`: the `checkpoints` (folders), the
    `files` (names in `out`) and the saved model folder."""
    for cp in checkpoints:
        shutil.rmtree(cp)
    for name in files:
        (out / name).unlink(missing_ok=True)
    if (out / MODEL_DIRNAME).exists():  # the same folder name for both trainers
        shutil.rmtree(out / MODEL_DIRNAME)


def card_text(body: str, *, base_model=None, is_peft: bool, tags) -> str:
    """A model card (README.md) as the Hugging Face Hub reads it: `huggingface_hub.ModelCard` with
    its metadata header (base model, library, dualign's tags + `tags`) above `body` (Markdown)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=str(base_model) if base_model else None,
                         library_name="peft" if is_peft else "transformers",
                         tags=["dualign", "safety-alignment", *tags])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


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
