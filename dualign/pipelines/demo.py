"""`dualign demo`: MoCAN or PeCAN on the embedded default, sized for a 2-core CPU."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data.demo_data import demo_path
from ..models.loading import EMBEDDED_DEFAULT
from ..train.demo_scorers import demo_scorers
from .config import MoCANConfig, PeCANConfig


# Preference pairs of the demos that train more than once (the file is shuffled): the full PeCAN
# demo pre-aligns on them, relabels them and trains on them (three trainings: 240 keeps it near 20
# minutes on an idle 2-core CPU), and every point of the sweep demo and method of the compare
# demo trains on them. The MoCAN demo trains once, on all 833.
DEMO_SUBSET_PAIRS = 240


def _demo_settings(quick: bool, beta: float, epochs: float | None, *, margin_fraction: float,
                   max_pairs: int, default_epochs: float, train_extra: dict) -> dict:
    """What both demos share: prompts and splits, generation, β, bootstrap, LoRA training;
    `margin_fraction`, `max_pairs` (0: all), `default_epochs` (`epochs` overrides it) and
    `train_extra` (more training settings) are the method's own. The quick demo uses 16
    prompts, 48 pairs and one epoch."""
    prompts = str(demo_path("prompts"))
    train = {"learning_rate": 1e-4, "per_device_train_batch_size": 4, "lora_r": 16, "lora_alpha": 32,
             "max_length": 192, "warmup_steps": 0, "save_steps": 20, "logging_steps": 5, "seed": 0,
             **train_extra, "num_train_epochs": epochs or (1 if quick else default_epochs)}
    # sample_batch_size 512: all 424 rows of the sample stage in one batch; each decoding step
    # reads every weight once whatever the rows, and 424 rows make 4 batches of 128 one (about
    # 1.8 GB of keys and values; bench/sampling.py --demo-stage)
    return dict(policy=EMBEDDED_DEFAULT, margin_fraction=margin_fraction, prompts=prompts, prompt_split="train",
                eval_prompts=prompts, eval_split="eval", max_prompts=16 if quick else 0,
                max_eval_prompts=12 if quick else 0, num_samples=4, max_new_tokens=32 if quick else 48,
                temperature=1.0, top_p=0.9, seed=0, sample_batch_size=512, beta=beta,
                bootstrap=200 if quick else 1000, max_pairs=48 if quick else max_pairs, eval_num_samples=2,
                train=train)


def demo_config(out, *, quick: bool = False, margin: float | None = None, beta: float = 0.1,
                epochs: float | None = None, log=print) -> MoCANConfig:
    """The demo's MoCAN settings: SmolLM2-135M-Instruct as π_ref, reward and cost heads
    trained on the built-in preference data (cached), the built-in prompts (train split for
    the dual, eval split held out), and the built-in preference pairs relabeled with λ*
    (the paper's recipe with PKU-SafeRLHF), trained once with LoRA. The constraint is on
    expected harm (`harm:`, safety = −max(cost, 0)) at 0.95 × its largest achievable gain."""
    reward_dir, cost_dir = demo_scorers(log=log)
    # harm: only cost above 0 counts (safety = -max(cost, 0)): every safe answer scores alike, so
    # the constraint cannot be met by refusing benign requests (with `cost:` it was)
    return MoCANConfig(
        out=str(Path(out)), reward=f"reward:{reward_dir}", safety={"harm": f"harm:{cost_dir}"},
        margins={} if margin is None else {"harm": margin}, pairs=str(demo_path("train")),
        # margin 0.95 × the largest gain. The reward is helpfulness only (it prefers compliance on
        # every harmful pair), so λ* alone decides which harmful pairs the refusal wins: 258 of
        # the 833 labels at 0.95 (λ* 4.07), against 14 when the reward itself preferred refusals.
        # sft_weight: the built-in pairs are text π_ref did not write; the pure soft-label loss moved
        # their log-ratios (KL 6 nats) but not what the model generates (refusal of held-out harmful
        # prompts stayed at 0%); the label-weighted likelihood term makes it say the preferred texts.
        # max_response_length 40: whether to refuse is decided in an answer's first tokens; training
        # on whole answers spread the loss over their content and, after one epoch, the model still
        # refused only 49% of its own training harmful prompts. 16-token prefixes fixed that but cut
        # the refusals (32 tokens at the median) before their end: the model said "I won't help"
        # and went on to help. 40 tokens hold most refusals with their EOS (README, "What we
        # measured on the way"). lora_last_layers 10: backward stops at block 20 of 30, and
        # cache_frozen_blocks runs the 20 blocks below once per pair instead of once per step.
        **_demo_settings(quick, beta, epochs, margin_fraction=0.95, max_pairs=0, default_epochs=3,
                         train_extra={"sft_weight": 1.0, "learning_rate": 3e-4, "max_response_length": 40,
                                      "lora_last_layers": 10, "cache_frozen_blocks": True}))


def pecan_demo_config(out, *, quick: bool = False, margin: float | None = None, beta: float = 0.1,
                      epochs: float | None = None, log=print) -> PeCANConfig:
    """The demo's PeCAN settings: the MoCAN demo's π_ref, prompts, generation and training,
    but no score model in training — DPO_H and DPO_S are pre-aligned on the built-in
    preference pairs (`better_response_id`, `safer_response_id`), whose relabeled pairs then
    train the PeCAN model. The demo's reward and cost heads only judge the result
    (`scorer/reward`, `scorer/safety/harm`), next to the implicit scores.

    Sized for ≤ 30 minutes on an idle 2-core CPU (19 min measured, scorers cached):
    PeCAN trains three times and scores every pair under three models, so it
    uses at most `DEMO_SUBSET_PAIRS` preference pairs (the file is shuffled), DPO_H and
    DPO_S get one epoch each (they only need the direction of each label) and the one-shot
    model the MoCAN demo's epochs."""
    reward_dir, cost_dir = demo_scorers(log=log)
    # PeCAN keeps the settings it was measured with (README): its implicit ĝ has no harm scale
    # to clip, and the likelihood term has not been measured with its pre-aligned models yet
    settings = _demo_settings(quick, beta, epochs, margin_fraction=0.5, max_pairs=DEMO_SUBSET_PAIRS,
                              default_epochs=2, train_extra={})
    return PeCANConfig(
        out=str(Path(out)), reward=f"reward:{reward_dir}", safety={"harm": f"cost:{cost_dir}"},
        preferences=str(demo_path("train")), pre_align={"num_train_epochs": 1},
        margins={} if margin is None else {PeCANConfig.HARMLESS: margin}, **settings)


def sweep_demo_config(out, *, quick: bool = False, log=print) -> MoCANConfig:
    """`dualign sweep --demo`: the MoCAN demo's π_ref, scorers, prompts and training recipe,
    sized so that four points (four trainings and evaluations on shared samples and scores)
    fit in 25 minutes on an idle 2-core CPU (17 min 54 s measured, scorers cached): each point
    trains one epoch on the same `DEMO_SUBSET_PAIRS` preference pairs (the demo: 833 pairs × 3
    epochs, about 20 minutes a point) and is evaluated on the held-out prompts without the
    borderline suite (refusal of the held-out harmful and benign prompts is still measured).
    `quick`: the quick demo's settings."""
    cfg = demo_config(out, quick=quick, log=log)
    if quick:
        return cfg
    return dataclasses.replace(cfg, max_pairs=DEMO_SUBSET_PAIRS, behaviour_suites="none",
                               train={**cfg.train, "num_train_epochs": 1})


def compare_demo_config(out, *, quick: bool = False, log=print):
    """`dualign compare --demo`: the MoCAN demo's π_ref, scorers, prompts, margin and training
    recipe, with every method trained on the same `DEMO_SUBSET_PAIRS` preference pairs (the file
    is shuffled) so that the five-method comparison fits in about 45 minutes on the 2 cores:
    MoCAN 2 epochs, each DPO-family rival 1 epoch (as PeCAN's DPO_H and DPO_S), the primal–dual
    baseline a fixed number of GRPO steps. The quick version shrinks everything for a smoke run."""
    from .compare import CompareConfig

    base = demo_config(out, quick=quick, log=log)
    cfg = CompareConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    cfg.max_pairs = 48 if quick else DEMO_SUBSET_PAIRS
    cfg.train = {**cfg.train, "num_train_epochs": 1 if quick else 2}
    cfg.baseline_train = {"num_train_epochs": 1}
    cfg.primal_dual = {"max_steps": 2 if quick else 24, "num_generations": 4,
                       "per_device_train_batch_size": 8 if quick else 16, "max_new_tokens": cfg.max_new_tokens}
    cfg.methods = ["mocan", "dpo_h", "dpo_s", "safedpo", "primal_dual"] if not quick else \
        ["mocan", "dpo_h", "dpo_s", "safedpo", "sacpo", "p_sacpo", "primal_dual"]
    return cfg
