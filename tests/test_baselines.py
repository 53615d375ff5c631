"""The rivals built on the preference trainer: SafeDPO's pair transform and loss, SACPO's two
stages and P-SACPO's interpolation, on hand-made cases and tiny models."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from bandit_helpers import one_thread  # noqa: F401  (autouse: tiny models run faster on one thread)
from dualign.errors import InputError
from dualign.pipelines.baselines import safedpo_pairs, scale_adapter
from dualign.train.losses import pseudo_preference_loss


def _prefs(rows):
    """rows: (better_response_id, is_response_0_safe, is_response_1_safe)."""
    return pd.DataFrame({
        "prompt": [f"p{i}" for i in range(len(rows))],
        "response_0": [f"a{i}" for i in range(len(rows))],
        "response_1": [f"b{i}" for i in range(len(rows))],
        "better_response_id": [r[0] for r in rows],
        "safer_response_id": [0] * len(rows),
        "is_response_0_safe": pd.array([r[1] for r in rows], dtype="boolean"),
        "is_response_1_safe": pd.array([r[2] for r in rows], dtype="boolean"),
    })


def test_safedpo_transform_matches_hand_made_cases():
    prefs = _prefs([
        (1, True, False),   # winner 1 unsafe, loser 0 safe -> reordered: 0 preferred, offset delta
        (0, True, False),   # winner 0 safe, loser 1 unsafe -> kept, offset delta
        (1, True, True),    # both safe -> kept, offset 0
        (0, False, False),  # both unsafe -> kept (helpfulness order), offset 0
        (0, False, True),   # winner 0 unsafe, loser 1 safe -> reordered: 1 preferred, offset delta
        (1, False, True),   # winner 1 safe, loser 0 unsafe -> kept, offset delta
    ])
    out = safedpo_pairs(prefs, delta=3.0)
    assert out["label"].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert out["reordered"].tolist() == [True, False, False, False, True, False]
    # after reordering the preferred answer is never unsafe while the other is safe, so the
    # offset is Δ exactly where the preferred is safe and the other unsafe (reordered or not)
    assert out["offset"].tolist() == [3.0, 3.0, 0.0, 0.0, 3.0, 3.0]
    assert list(out.columns[:3]) == ["prompt", "response_0", "response_1"]
    assert out["response_1"].tolist() == prefs["response_1"].tolist()  # texts never move


def test_safedpo_errors_name_record_and_field():
    prefs = _prefs([(1, True, False), (0, True, None)])
    prefs.attrs["source"] = "prefs.jsonl"
    with pytest.raises(InputError) as e:
        safedpo_pairs(prefs, 1.0)
    assert "prefs.jsonl" in str(e.value) and "record 2" in str(e.value) and "is_response_1_safe" in str(e.value)
    with pytest.raises(InputError, match="safedpo_delta"):
        safedpo_pairs(_prefs([(1, True, True)]), -1.0)
    with pytest.raises(InputError, match="safedpo_delta"):
        safedpo_pairs(_prefs([(1, True, True)]), float("nan"))


def test_offset_loss_is_safedpo_loss_by_hand():
    # pair 0: y1 preferred by Δ; pair 1: y0 preferred, no offset
    pl1, pl0, rl1, rl0 = (torch.tensor(v, dtype=torch.float64) for v in ([-2.0, -5.0], [-3.0, -4.0],
                                                                          [-2.5, -4.5], [-2.0, -4.5]))
    labels = torch.tensor([1.0, 0.0], dtype=torch.float64)
    offset = torch.tensor([2.0, 0.0], dtype=torch.float64)
    beta = 0.5
    got = pseudo_preference_loss(pl1, pl0, rl1, rl0, labels, beta, reduction="none", offset=offset).numpy()
    # pair 0: log-ratio gap (−2+2.5) − (−3+2) = 1.5 → βΔ = 0.75, minus the offset 2 → −1.25
    # pair 1: gap (−5+4.5) − (−4+4.5) = −1.0 → −βΔ = 0.5 for the preferred y0
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    np.testing.assert_allclose(got, [-math.log(sig(-1.25)), -math.log(sig(0.5))], rtol=1e-12)
    # no offset: the plain DPO loss
    plain = pseudo_preference_loss(pl1, pl0, rl1, rl0, labels, beta, reduction="none").numpy()
    np.testing.assert_allclose(plain[0], -math.log(sig(0.75)), rtol=1e-12)


def test_offset_column_is_validated(tmp_path):
    from dualign.train.preference import validate_pairs

    pairs = pd.DataFrame({"prompt": ["p", "q"], "response_0": ["a", "b"], "response_1": ["c", "d"],
                          "label": [1.0, 0.0], "offset": [0.0, -1.0]})
    with pytest.raises(InputError) as e:
        validate_pairs(pairs)
    assert "offset" in str(e.value) and "record 1" in str(e.value)


def test_scale_adapter_interpolates_lora_b(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "adapter"
    src.mkdir()
    state = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(2, 4),
             "base_model.model.layers.0.q_proj.lora_B.weight": torch.full((4, 2), 3.0)}
    save_file(state, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text("{}")
    out = scale_adapter(src, tmp_path / "half", 0.25)
    got = load_file(str(out / "adapter_model.safetensors"))
    torch.testing.assert_close(got["base_model.model.layers.0.q_proj.lora_A.weight"], torch.ones(2, 4))
    torch.testing.assert_close(got["base_model.model.layers.0.q_proj.lora_B.weight"], torch.full((4, 2), 0.75))
    assert (out / "adapter_config.json").exists() and not (tmp_path / "half.tmp").exists()
    with pytest.raises(InputError, match="p_sacpo_weight"):
        scale_adapter(src, tmp_path / "bad", 1.5)
    with pytest.raises(InputError, match="no LoRA adapter"):
        scale_adapter(tmp_path / "half.none", tmp_path / "bad", 0.5)
