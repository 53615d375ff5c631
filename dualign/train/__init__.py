"""Preference training: the soft-label DPO loss of CAN on HF `Trainer` (LoRA or full)."""
from .losses import hard_labels, pseudo_preference_labels, pseudo_preference_loss
from .preference import (PreferenceConfig, TrainResult, load_trained, reference_logps,
                         train_preferences)
from .primal_dual import PrimalDualConfig, PrimalDualResult, lagrange_step, train_primal_dual

__all__ = ["pseudo_preference_loss", "pseudo_preference_labels", "hard_labels",
           "PreferenceConfig", "TrainResult", "train_preferences", "load_trained",
           "reference_logps", "PrimalDualConfig", "PrimalDualResult", "lagrange_step",
           "train_primal_dual"]
