"""`PreferenceTrainer`: the `transformers.Trainer` subclass that trains on preference pairs with
the soft-label DPO loss (`pseudo_preference_loss`) on precomputed reference log-probs, logging
reward margins and accuracies, with batches ordered by `EpochSeededLengthSampler`. This module
imports torch and transformers when it is imported; only training code imports it
(`dualign.train.preference.preference_trainer_class` does so on first use), so the dual math
and the CLI stay importable without them.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import Trainer

from .frozen_blocks import from_block
from .losses import pseudo_preference_loss
from .pairs_data import EpochSeededLengthSampler
from .policy_logps import label_weighted_nll, pair_logps, response_lengths


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
        # One order for all ranks, grouped by the global batch of an optimizer step: accelerate
        # deals its consecutive per-rank batches round-robin, so DDP with per-device batch b on
        # W ranks trains on exactly the pairs one process with batch W·b does, step by step.
        return EpochSeededLengthSampler(
            ds.lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size,
            seed=self.args.seed, group_by_length=getattr(self, "group_by_length", True))

    def policy_logps(self, model, inputs):
        """log π_θ(y1|x), log π_θ(y0|x), each shape (B,) (see `pair_logps`)."""
        if self.frozen_blocks and "inputs_embeds" in inputs:
            # the block list is cut in the model itself (a DDP wrapper has no `config`); the
            # forward still goes through the wrapper, which syncs the gradients
            with from_block(self.accelerator.unwrap_model(model), self.frozen_blocks):
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
        means = {k: float(np.mean(v)) for k, v in self._pref_metrics.items() if v}
        if self.args.world_size > 1 and means:
            # every rank logs at the same steps with the same keys in the same order: average
            # the ranks (equal batches), so the logged margins are the global batch's, as the loss is
            t = torch.tensor(list(means.values()), dtype=torch.float64, device=self.args.device)
            t = self.accelerator.reduce(t, reduction="mean")
            means = dict(zip(means, t.tolist()))
        logs.update(means)
        self._pref_metrics = {}
        super().log(logs, start_time)
