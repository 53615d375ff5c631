"""MoCAN (docs/design.md §4): model-based one-shot safety alignment.

    sample π_ref → score (reward, safety) → solve the dual (λ*) → pseudo-preference pairs
    → train once → evaluate against π_ref → report

Each stage writes into the run directory and is skipped when its inputs are unchanged;
`start` forces a stage (and all later ones) to rerun, `stop` ends after a stage.
"""
from __future__ import annotations

from pathlib import Path

from ..data.preferences import load_preferences
from ..models.loading import load_policy
from ..parallel import process_group, rank_device
from ..runio import file_digest, run_lock, write_json, write_parquet
from . import stages as S
from .config import MoCANConfig
from .pairs import dataset_as_samples, labels_decided_line, pairs_from_samples, pairs_from_scored_dataset
from .scoring import score_jobs


def run_mocan(cfg: MoCANConfig, start: str | None = None, stop: str | None = None, log=print,
              baselines: dict | None = None) -> Path:
    """Run (or resume) MoCAN in `cfg.out`. `baselines`: name → loader of (model, tokenizer,
    model name), other models evaluated next to MoCAN's on the same prompts, with their KL
    (`dualign compare`)."""
    cfg.validate()
    # under torchrun / accelerate launch, one process group for the whole run: every sharded stage
    # (sampling, scoring, log-probs) and the Trainer use it. A gloo group torn down and set up again
    # in one process can fail to connect (it did at the third stage, every 2-rank run)
    with run_lock(cfg.out), process_group():  # run_lock: a second run into the folder is refused
        return _run_mocan(cfg, start, stop, log, baselines)


def _run_mocan(cfg: MoCANConfig, start: str | None, stop: str | None, log, baselines: dict | None) -> Path:
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    clock = S.StageClock(run, log)  # timings.json: wall time per stage
    try:
        write_json(cfg.to_dict(), run / "config.json")
        force, todo = S.stage_plan(start, stop)

        jobs = score_jobs(cfg.reward, cfg.safety)  # checks every sign before any model loads
        safety_cols = [j.column for j in jobs if j.role == "safety"]
        prompts = S.prompts_of(cfg.prompts, cfg.prompt_column, cfg.prompt_split, cfg.max_prompts or None)
        # under torchrun / accelerate launch each rank takes its own GPU (cuda:LOCAL_RANK), not all
        # cuda:0; one process: the default device, as before
        policy, tok = load_policy(cfg.policy, device=rank_device(None))

        clock("sample", f"[1/7 sample] {len(prompts)} prompts × {cfg.num_samples} responses from {cfg.policy}")
        samples = S.sample_stage(run, policy, tok, prompts, cfg, model_name=cfg.policy,
                                 num_samples=cfg.num_samples, force=force["sample"])
        if not todo("score"):
            return run
        clock("score", "[2/7 score] reward and safety of every sample")
        scores = S.score_stage(samples, jobs, force=force["score"], log=log)
        if not todo("dual"):
            return run
        clock("dual", "[3/7 dual] λ* and what π_λ* will do, before any training")
        dual = S.dual_stage(run, scores, safety_cols, cfg.beta, cfg.margins, cfg.margin_fraction,
                            cfg.bootstrap, cfg.seed, force=force["dual"], log=log, max_unsafe_rate=cfg.max_unsafe_rate)
        eval_prompts = S.prompts_of(cfg.eval_prompts or cfg.prompts, cfg.prompt_column, cfg.eval_split,
                                    cfg.max_eval_prompts or None)
        held_out = None
        if cfg.eval_num_samples >= 2:
            # π_ref on the held-out prompts, now: λ* predicts there before training (the evaluate
            # stage finds these samples and scores current)
            ref_eval = S.reference_eval_samples(run, policy, tok, eval_prompts, cfg, cfg.policy)
            held_out = S.held_out_prediction_of(S.score_stage(ref_eval, jobs, log=log), dual,
                                                "reward", safety_cols, seed=cfg.seed)
            if held_out is not None:
                log("  " + S.held_out_prediction_line(held_out))
        if not todo("pairs"):
            return run
        clock("pairs", f"[4/7 pairs] pseudo-preference labels σ(r_λ(y1) − r_λ(y0)) on pairs from {cfg.pairs}")
        if cfg.pairs == "samples":
            pairs, key = pairs_from_samples(scores, cfg.pairs_per_prompt, cfg.seed), file_digest(run / "scores.parquet")
        else:
            prefs = load_preferences(cfg.pairs, limit=cfg.max_pairs or None)
            write_parquet(dataset_as_samples(prefs), run / "pairs_source" / "samples.parquet")
            pair_scores = S.score_stage(run / "pairs_source" / "samples.parquet", jobs, force=force["pairs"], log=log)
            pairs, key = pairs_from_scored_dataset(pair_scores), file_digest(run / "pairs_source" / "scores.parquet")
        # dual.json's constraint kinds say which λ* multiply −1{unsafe} (rate constraints) in the labels
        pairs = S.pairs_stage(run, pairs, dual.lam, safety_cols, key=key, force=force["pairs"], dual=dual)
        log(labels_decided_line(pairs))
        if not todo("train"):
            return run
        clock("train", f"[5/7 train] one-shot training on {len(pairs)} pairs (β = {cfg.beta})")
        meta = {"method": "mocan", "base_model": cfg.policy, "lambda": list(dual.lam), "margins": list(dual.margins),
                "beta": cfg.beta, "data": cfg.pairs, "scores": {c: s for c, s, _ in jobs}}
        if cfg.max_unsafe_rate:  # the model card says which λ* weigh −1{unsafe} rather than the score
            meta.update(max_unsafe_rate=dict(cfg.max_unsafe_rate),
                        lambda_scores={c.name: c.score or c.name for c in dual.constraints})
        result = S.train_stage(run, policy, tok, pairs, cfg.beta, cfg.train, meta, force=force["train"])
        if not todo("evaluate"):
            return run
        clock("evaluate", f"[6/7 evaluate] π_ref vs trained on {len(eval_prompts)} held-out prompts")
        record = S.evaluate_stage(run, result, cfg.policy, eval_prompts, jobs, cfg, method="mocan",
                                  dual=dual, force=force["evaluate"], log=log, held_out=held_out,
                                  baselines=baselines, baseline_kl=bool(baselines))
        if not todo("report"):
            return run
        clock("report", "[7/7 report]")
        S.report_stage(run, cfg.to_dict(), dual, record)
        return run
    finally:
        clock.stop()
