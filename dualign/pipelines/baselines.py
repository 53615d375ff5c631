"""Rivals trained from preference data with helpfulness and safety labels, on dualign's own
preference trainer (same loss code, LoRA settings, resume and saving as MoCAN):

- DPO_H / DPO_S: plain DPO on `better_response_id` / `safer_response_id` (`pecan.dpo_pairs`);
- SafeDPO (Kim et al., ICLR 2026): one DPO stage on safety-reordered pairs with a logit offset;
- SACPO (Wachi et al., NeurIPS 2024): helpfulness DPO from π_ref, then safety DPO from that
  model with KL coefficient β/λ; P-SACPO: a weight interpolation between the two stages.

Every function takes the normalized preference table of `dualign.data.preferences`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..runio import write_json


def _unsafe_flags(prefs: pd.DataFrame, file: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(h0, h1): 1 where response 0 / 1 is unsafe, as int arrays; missing flags raise."""
    out = []
    for j in (0, 1):
        col = prefs[f"is_response_{j}_safe"]
        missing = col.isna().to_numpy()
        if missing.any():
            raise InputError("SafeDPO needs a safety flag for every response", file=file,
                             record=int(np.flatnonzero(missing)[0]) + 1, field=f"is_response_{j}_safe")
        out.append((~col.astype(bool)).to_numpy().astype(np.int64))
    return out[0], out[1]


def safedpo_pairs(prefs: pd.DataFrame, delta: float) -> pd.DataFrame:
    """SafeDPO's training pairs from helpfulness preferences and per-response safety flags.

    The variant built here: with w the helpfulness winner (`better_response_id`), l the other
    response and h = 1{unsafe},

    - the pair is reordered when the winner is unsafe and the loser safe (h_w = 1, h_l = 0):
      the safe answer becomes the preferred one; every other pair keeps its helpfulness order
      (both safe, both unsafe, or already safe-over-unsafe);
    - after the reordering, the offset is Δ·(h_l − h_w) ∈ {0, Δ}: the preferred answer must win
      by Δ in the logit exactly where it is safe and the other unsafe.

    Trained with `pseudo_preference_loss` on hard labels, the loss is
    −log σ(β[log π/π_ref(y_w) − log π/π_ref(y_l)] − Δ(h_l − h_w)), SafeDPO's objective.

    Parameters
    ----------
    prefs : pandas.DataFrame, n rows
        Normalized preference table with `better_response_id` and both `is_response_*_safe`.
    delta : float
        Δ ≥ 0, in logit units (0: the reordering alone).

    Returns
    -------
    pandas.DataFrame, n rows
        `prompt`, `response_0`, `response_1`, `label` (1.0 when response 1 is preferred after the
        reordering, else 0.0), `offset`, and `reordered` (bool).

    Raises
    ------
    InputError
        Δ negative or not finite, or a response without a safety flag (record counted from 1).
    """
    if not (np.isfinite(delta) and delta >= 0):
        raise InputError(f"must be a finite number >= 0; got {delta}", field="safedpo_delta")
    file = prefs.attrs.get("source")
    h0, h1 = _unsafe_flags(prefs, file)
    better = prefs["better_response_id"].to_numpy()
    if (better < 0).any():
        raise InputError("SafeDPO needs a helpfulness label for every pair", file=file,
                         record=int(np.flatnonzero(better < 0)[0]) + 1, field="better_response_id")
    h_w = np.where(better == 1, h1, h0)
    h_l = np.where(better == 1, h0, h1)
    reorder = (h_w == 1) & (h_l == 0)
    winner = np.where(reorder, 1 - better, better)
    h_w, h_l = np.where(reorder, h_l, h_w), np.where(reorder, h_w, h_l)
    out = prefs[["prompt", "response_0", "response_1"]].copy()
    out["label"] = (winner == 1).astype(np.float64)
    out["offset"] = float(delta) * (h_l - h_w).astype(np.float64)
    out["reordered"] = reorder
    return out.reset_index(drop=True)


def scale_adapter(src: str | Path, dst: str | Path, weight: float) -> Path:
    """P-SACPO's interpolation θ = θ_h + q·(θ_hs − θ_h) for a LoRA adapter trained on top of θ_h.

    With θ_hs = θ_h + (α/r)·B·A, the interpolation is the same adapter with B scaled by q, so
    the result is a copy of `src` (an adapter folder of `train_preferences`) with every
    `lora_B` weight multiplied by `weight`. Written atomically (a temp folder renamed); a
    `dst` already made from the same adapter file with the same weight is kept as it is.

    Raises
    ------
    InputError
        `src` holds no LoRA adapter, or `weight` is outside [0, 1].
    """
    import torch
    from safetensors.torch import load_file, save_file

    from ..runio import file_digest

    src, dst = Path(src), Path(dst)
    if not (0.0 <= weight <= 1.0):
        raise InputError(f"must be in [0, 1]; got {weight}", field="p_sacpo_weight")
    weights = src / "adapter_model.safetensors"
    if not weights.exists():
        raise InputError("no LoRA adapter (adapter_model.safetensors) to interpolate", file=str(src))
    made_from = {"adapter": file_digest(weights), "weight": float(weight)}
    stamp = dst / "interpolation.json"
    if stamp.exists() and json.loads(stamp.read_text()) == made_from:
        return dst  # already made from this adapter with this weight
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    state = load_file(str(weights))
    n = 0
    for k, v in state.items():
        if "lora_B" in k:
            state[k] = (v.to(torch.float32) * weight).to(v.dtype).contiguous()
            n += 1
    if n == 0:
        shutil.rmtree(tmp)
        raise InputError("the adapter has no lora_B weights", file=str(weights))
    save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    info_path = tmp / "dualign_train.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        info.setdefault("metadata", {}).update(method="p_sacpo", p_sacpo_weight=weight, interpolated_from=str(src))
        write_json(info, info_path)
    write_json(made_from, tmp / "interpolation.json")
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def save_merged(model, tokenizer, out: str | Path) -> Path:
    """Merge a LoRA model into its base and save full safetensors weights at `out` (atomically):
    SACPO's second stage starts from, and is regularized towards, the merged first stage."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
