"""MoCAN (docs/design.md §4): model-based one-shot safety alignment.

    sample π_ref → score (reward, safety) → solve the dual (λ*) → pseudo-preference pairs
    → train once → evaluate against π_ref → report

Each stage writes into the run directory and is skipped when its inputs are unchanged;
`start` forces a stage (and all later ones) to rerun, `stop` ends after a stage (`run.Run`).
"""
from __future__ import annotations

from pathlib import Path

from ..data.preferences import load_preferences
from ..data.prompts import config_prompts
from ..models.loading import load_policy
from ..parallel import rank_device
from ..runio import file_digest, write_parquet
from . import stages as S
from .config import MoCANConfig
from .evaluate import EvalPlan, evaluate_stage
from .pairs import dataset_as_samples, labels_decided_line, pairs_from_samples, pairs_from_scored_dataset
from .run import Run
from .scoring import safety_columns, score_jobs


def run_mocan(cfg: MoCANConfig, start: str | None = None, stop: str | None = None, log=print,
              baselines: dict | None = None) -> Path:
    """Run (or resume) MoCAN in `cfg.out`; returns the run directory. `baselines`: name → loader
    of (model, tokenizer, model name), other models evaluated next to MoCAN's on the same
    prompts, with their KL (`dualign compare`)."""
    with Run(cfg, S.STAGES, start, stop, log) as run:
        jobs = score_jobs(cfg.reward, cfg.safety)  # checks every sign before any model loads
        safety_cols = safety_columns(jobs)
        prompts = config_prompts(cfg)
        # under torchrun / accelerate launch each rank takes its own GPU (cuda:LOCAL_RANK), not all
        # cuda:0; one process: the default device. π_ref stays π_ref: training returns a new model
        policy, tok = load_policy(cfg.policy, device=rank_device(None))

        run.begin("sample", f"[1/7 sample] {len(prompts)} prompts × {cfg.num_samples} responses from {cfg.policy}")
        samples = S.sample_stage(run.dir, policy, tok, prompts, cfg, model_name=cfg.policy,
                                 num_samples=cfg.num_samples, force=run.force("sample"))
        run.begin("score", "[2/7 score] reward and safety of every sample")
        scores = S.score_stage(samples, jobs, force=run.force("score"), log=log)
        run.begin("dual", "[3/7 dual] λ* and what π_λ* will do, before any training")
        dual = S.dual_stage(run.dir, scores, safety_cols, cfg, force=run.force("dual"), log=log)
        eval_prompts = config_prompts(cfg, evaluation=True)
        held_out = S.held_out_stage(run.dir, policy, tok, eval_prompts, jobs, dual, cfg, log=log)

        run.begin("pairs", f"[4/7 pairs] pseudo-preference labels σ(r_λ(y1) − r_λ(y0)) on pairs from {cfg.pairs}")
        pairs, key = pairs_to_label(run, scores, jobs)
        # dual.json's constraint kinds say which λ* multiply −1{unsafe} (rate constraints) in the labels
        pairs = S.pairs_stage(run.dir, pairs, dual.lam, safety_cols, key=key, force=run.force("pairs"), dual=dual)
        log(labels_decided_line(pairs))
        run.begin("train", f"[5/7 train] one-shot training on {len(pairs)} pairs (β = {cfg.beta})")
        result = S.train_stage(run.dir, policy, tok, pairs, cfg, model_card(cfg, dual, jobs), force=run.force("train"))
        run.begin("evaluate", f"[6/7 evaluate] π_ref vs trained on {len(eval_prompts)} held-out prompts")
        plan = EvalPlan(baselines=baselines or {}, baseline_kl=bool(baselines))
        record = evaluate_stage(run.dir, result, (policy, tok), eval_prompts, jobs, cfg, method="mocan", dual=dual,
                                plan=plan, held_out=held_out, force=run.force("evaluate"), log=log)
        run.begin("report", "[7/7 report]")
        S.report_stage(run.dir, cfg.to_dict(), dual, record)
    return run.dir


def pairs_to_label(run: Run, scores, jobs):
    """The pairs MoCAN labels and the digest of their scores (the pairs stage's key):
    π_ref's samples paired (`pairs: samples`), or a preference dataset's responses, scored
    by `jobs` into run/pairs_source/ (the dataset's pairs, relabeled as in the paper)."""
    cfg = run.cfg
    if cfg.pairs == "samples":
        return pairs_from_samples(scores, cfg.pairs_per_prompt, cfg.seed), file_digest(run.dir / "scores.parquet")
    source = run.dir / "pairs_source" / "samples.parquet"
    write_parquet(dataset_as_samples(load_preferences(cfg.pairs, limit=cfg.max_pairs or None)), source)
    pair_scores = S.score_stage(source, jobs, force=run.force("pairs"), log=run.log)
    return pairs_from_scored_dataset(pair_scores), file_digest(source.with_name("scores.parquet"))


def model_card(cfg: MoCANConfig, dual, jobs) -> dict:
    """The trained model's metadata (model card, dualign_train.json): λ*, margins, β, the data
    and the score models; with rate constraints, which λ* weigh −1{unsafe} rather than the score."""
    meta = {"method": "mocan", "base_model": cfg.policy, "lambda": list(dual.lam), "margins": list(dual.margins),
            "beta": cfg.beta, "data": cfg.pairs, "scores": {c: s for c, s, _ in jobs}}
    if cfg.max_unsafe_rate:
        meta.update(max_unsafe_rate=dict(cfg.max_unsafe_rate),
                    lambda_scores={c.name: c.score or c.name for c in dual.constraints})
    return meta
