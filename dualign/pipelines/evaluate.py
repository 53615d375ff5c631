"""The evaluate stage: π_ref, the trained model and any baselines sampled on the same held-out
prompts with the same settings, scored and compared with the dual's predictions (eval.json), the
KL each moved from π_ref, and their behaviour on harmful, benign and borderline prompts judged
by a detector independent of the scores."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .stages import (held_out_prediction_of, learned_tilt_of, model_ident, reference_eval_samples, sample_stage,
                     score_stage, tokenization_of, train_config)

if TYPE_CHECKING:
    from .dual_stage import DualRecord, HeldOutPrediction


# log π_θ and log π_ref of the training prompts' π_ref samples (the learned tilt on what was seen)
TRAINING_LOGPS = "training_samples_logps.parquet"


@dataclass(frozen=True)
class EvalPlan:
    """What the evaluate stage compares beyond π_ref and the trained model, and how it scores
    (the defaults: MoCAN's, the jobs' scores and no other model).

    Attributes
    ----------
    score : callable(list of samples paths, force) -> list of DataFrame, optional
        Replaces scoring by the jobs (PeCAN adds implicit scores from log-probs); it gets
        every model's samples at once, so a model it loads is loaded once.
    reward_cols : sequence of str
        Columns compared like a reward (no unsafe rate); the first is the one the dual's
        predictions attach to.
    safety_cols : sequence of str, optional
        Columns compared like a safety score (the first carries the dual's predictions);
        default: the jobs' safety columns.
    unsigned_cols : sequence of str
        Safety columns without a meaningful sign (no unsafe rate; PeCAN's implicit ĝ).
    baselines : dict name -> callable() -> (model, tokenizer, model_name)
        Other models (PeCAN: DPO_H, DPO_S; `dualign compare`: the rivals) sampled and scored
        on the same prompts with the same settings; each is compared with the reference into
        `eval.json["baselines"][name]`.
    baseline_logps : dict name -> column
        A baseline's own log-probs in its scored table (PeCAN: `logp/helpful` for DPO_H),
        next to `logp/ref`: its KL(π‖π_ref) goes to `eval.json["baselines_kl"][name]`.
    baseline_kl : bool
        Estimate every baseline's KL(π‖π_ref) on its own samples (`logp/<name>` while it is
        loaded, then `logp/ref`), as for the trained model (`dualign compare`);
        `baseline_logps` then defaults to those columns.
    """

    score: Callable | None = None
    reward_cols: tuple[str, ...] = ("reward",)
    safety_cols: tuple[str, ...] | None = None
    unsigned_cols: tuple[str, ...] = ()
    baselines: dict = field(default_factory=dict)
    baseline_logps: dict = field(default_factory=dict)
    baseline_kl: bool = False


def evaluate_stage(run: Path, result, reference, prompts, jobs, cfg, *, method: str, dual: DualRecord,
                   plan: EvalPlan | None = None, held_out: HeldOutPrediction | None = None,
                   force: bool = False, log=print) -> dict:
    """Sample the reference and the trained model on held-out prompts with the same settings,
    score both, compare → eval.json; and judge their behaviour (refusal of harmful prompts,
    over-refusal of benign and borderline ones) with a detector independent of the scores →
    eval.json["behaviour"] (`behaviour_plan`).

    Parameters
    ----------
    result : TrainResult
        The training's: `result.model` is the trained policy.
    reference : (model, tokenizer)
        π_ref (`cfg.policy`), as loaded by the recipe.
    jobs : list of ScoreJob
        Scorers run on every model's samples (`score_jobs`).
    plan : EvalPlan, optional
        Other models and columns to compare, and the scoring (default `EvalPlan()`).
    held_out : HeldOutPrediction, optional
        `held_out_prediction_of` the reference's evaluation samples, when the recipe already
        made it before training; else it is made here.
    """
    from ..eval.kl import achieved_kl, kl_of_own_samples
    from ..eval.report import kl_prediction_text
    from ..eval.summary import (compare_scores, format_eval_table, format_kind_gains, format_models_table,
                                 gains_by_prompt_kind)
    from ..runio import write_json
    from ..train.preference import RESULT_FILE
    from .scoring import REF, LogProbModel, logprob_columns, safety_columns

    run, plan, base = Path(run), plan or EvalPlan(), cfg.policy
    score = plan.score or (lambda paths, force: [score_stage(p, jobs, force=force, log=log) for p in paths])
    reward_cols = list(plan.reward_cols)
    safety_cols = safety_columns(jobs) if plan.safety_cols is None else \
        list(plan.safety_cols)
    tokenization = tokenization_of(train_config(run, cfg))  # log-probs for the KL as the training's
    ref_logps = LogProbModel(REF, base, lambda: reference)
    # the training record changes with every training, sharded weights or not
    trained_name = model_ident(result.model_dir, run, weights=result.output_dir / RESULT_FILE)
    suites = behaviour_plan(cfg, prompts)  # bad suites fail here, before any sampling
    ref_path = reference_eval_samples(run, *reference, prompts, cfg, base, force=force)
    behaviour_paths = {"reference": _behaviour_samples(run, *reference, suites, cfg, "reference", base, force)}
    trained_path = sample_stage(run, result.model, result.tokenizer, prompts, cfg, subdir="eval/trained",
                                model_name=trained_name, num_samples=cfg.eval_num_samples, force=force)
    behaviour_paths["trained"] = _behaviour_samples(run, result.model, result.tokenizer, suites, cfg, "trained",
                                                    trained_name, force)
    paths = {"reference": ref_path, "trained": trained_path}
    for name, load in plan.baselines.items():
        bmodel, btok, bname = load()
        paths[name] = sample_stage(run, bmodel, btok, prompts, cfg, subdir=f"eval/{name}", model_name=bname,
                                   num_samples=cfg.eval_num_samples, force=force)
        behaviour_paths[name] = _behaviour_samples(run, bmodel, btok, suites, cfg, name, bname, force)
        if plan.baseline_kl:  # its own log-probs now, while it is loaded
            own = LogProbModel(name, bname, lambda m=bmodel, t=btok: (m, t))
            logprob_columns([paths[name]], [own], force=force, log=log, **tokenization)
        del bmodel
    baseline_logps = dict(plan.baseline_logps)
    if plan.baseline_kl and plan.baselines:
        logprob_columns([paths[n] for n in plan.baselines], [ref_logps], force=force, log=log, **tokenization)
        baseline_logps = baseline_logps or {n: f"logp/{n}" for n in plan.baselines}
    tables = dict(zip(paths, score(list(paths.values()), force)))
    ref_scores, trained_scores = tables["reference"], tables["trained"]

    def compare(other, **predictions):
        return compare_scores(ref_scores, other, reward=reward_cols[0], safety=safety_cols,
                              other_rewards=reward_cols[1:], unsigned=list(plan.unsigned_cols), seed=cfg.seed,
                              **predictions)

    if held_out is None:
        held_out = held_out_prediction_of(ref_scores, dual, reward_cols[0], safety_cols, seed=cfg.seed)
    scores = compare(trained_scores, dual=dual, held_out=held_out)
    record = {"method": method, "beta": dual.beta, "lambda": list(dual.lam),
              "n_eval_prompts": len(prompts), "n_samples_per_prompt": cfg.eval_num_samples,
              "scores": scores, "train": result.summary(),
              "examples": _examples(ref_scores, trained_scores, reward_cols + safety_cols)}
    if plan.baselines:
        record["baselines"] = {name: compare(tables[name]) for name in plan.baselines}
    trained = LogProbModel("trained", trained_name, lambda: (result.model, result.tokenizer))
    record["kl"] = achieved_kl(trained_path, trained, ref_logps, tokenization, cfg, dual, force=force, log=log)
    # how much of λ*'s tilt the model carries: on π_ref's samples of the held-out prompts, and on
    # the samples it was trained on (pairs drawn from π_ref's samples): the gap is memorization
    tilt = fit = None
    if cfg.reference_eval_count() >= 2:
        tilt = _learned_tilt(ref_path, trained, ref_logps, tokenization, dual, reward_cols[0], safety_cols, cfg,
                             force=force, log=log)
    if getattr(cfg, "pairs", None) == "samples":
        # their log-probs go to a file of their own: scores.parquet keys the pairs stage
        fit = _learned_tilt(run / "samples.parquet", trained, ref_logps, tokenization, dual, reward_cols[0],
                            safety_cols, cfg, force=force, log=log, logps_path=run / "eval" / TRAINING_LOGPS)
    if tilt is not None:
        record["learned_tilt"] = tilt.to_dict()
    if fit is not None:
        record["learned_tilt_training_samples"] = fit.to_dict()
    if baseline_logps:
        record["baselines_kl"] = {name: kl_of_own_samples(tables[name], col, "logp/ref", cfg)
                                  for name, col in baseline_logps.items()}
    if suites[1]:
        record["scores_by_prompt_kind"] = gains_by_prompt_kind(ref_scores, trained_scores, suites[1],
                                                               reward_cols + safety_cols, seed=cfg.seed)
    if suites[0]:
        record["behaviour"] = behaviour_section(paths, behaviour_paths, suites, cfg, force=force)
    write_json(record, run / "eval.json")
    log(f"Evaluation on {len(prompts)} held-out prompts × {cfg.eval_num_samples} samples:")
    log(format_eval_table(scores))
    k = record["kl"]
    log(f"  KL(π_θ‖π_ref) achieved {k['achieved']:.3f} [{k['achieved_ci'][0]:.3f}, {k['achieved_ci'][1]:.3f}] nats, "
        f"predicted for π_λ* {kl_prediction_text(dual)}"
        + ("  (achieved indistinguishable from 0: the model barely moved)" if k["achieved_ci"][0] <= 0 else ""))
    from ..eval.tilt import learned_tilt_line

    if tilt is not None:
        log("  " + learned_tilt_line(tilt, None if held_out is None else
                                     {"reward": held_out.reward_gain, **held_out.safety_gain}))
    if fit is not None:
        log("  " + learned_tilt_line(fit, dual.predicted_gains(), where="training"))
    if record.get("scores_by_prompt_kind"):
        log("Gain by kind of prompt (a helpfulness reward falls where the model refuses harmful requests):")
        for line in format_kind_gains(record["scores_by_prompt_kind"]):
            log(line)
    if plan.baselines:
        log("Gain over the reference, every model on the same prompts:")
        log(format_models_table(record))
    if "behaviour" in record:
        from ..eval.behaviour import format_behaviour_table

        log(format_behaviour_table(record["behaviour"]))
    return record


def _learned_tilt(ref_path: Path, trained, reference, tokenization: dict, dual: DualRecord, reward_col: str,
                  safety_cols, cfg, *, force: bool, log, logps_path: Path | None = None):
    """How much of λ*'s tilt the trained model learned (`eval.tilt`), on π_ref's samples
    `ref_path` (scored next to it: the evaluation prompts' or the training prompts'): their
    log-probs under both models (`logp/<name>` columns, cached like the KL's, in those scores
    or in `logps_path`), then `learned_tilt_of`. None where the dual's constraints are not
    these scores or π_ref has fewer than 2 samples per prompt."""
    import pandas as pd

    from .scoring import logprob_columns

    if dual.names != list(safety_cols) or not Path(ref_path).exists():
        return None
    scores_path = Path(ref_path).parent / "scores.parquet"
    logprob_columns([ref_path], [trained, reference], force=force, log=log,
                    scores_paths=[logps_path or scores_path], **tokenization)
    table = pd.read_parquet(scores_path)
    if logps_path is not None:
        cols = [f"logp/{trained.name}", f"logp/{reference.name}"]
        table = table.drop(columns=[c for c in cols if c in table]).merge(
            pd.read_parquet(logps_path)[["prompt_id", "sample_id", *cols]], on=["prompt_id", "sample_id"])
    return learned_tilt_of(table, dual, reward_col, safety_cols, f"logp/{trained.name}", f"logp/{reference.name}",
                           seed=cfg.seed)


def _examples(ref_scores, trained_scores, columns, n: int = 6) -> list[dict]:
    """A few before/after responses: the prompts where the first `safety/` column of
    `columns` (the score columns to show) moved most."""
    ref0 = ref_scores[ref_scores.sample_id == 0].set_index("prompt_id")
    tr0 = trained_scores[trained_scores.sample_id == 0].set_index("prompt_id")
    safety = [c for c in columns if "safety/" in c]
    col = safety[0] if safety else columns[0]
    order = (tr0[col] - ref0[col]).abs().sort_values(ascending=False).index[:n]
    return [{"prompt": ref0.loc[i, "prompt"],
             "reference": {"response": ref0.loc[i, "response"], **{c: float(ref0.loc[i, c]) for c in columns}},
             "trained": {"response": tr0.loc[i, "response"], **{c: float(tr0.loc[i, c]) for c in columns}}}
            for i in order]


# ----------------------------------------------------------------------------- behaviour (evaluate)
# The evaluation's `behaviour` section: refusal of harmful prompts and over-refusal of benign
# ones, judged by a detector independent of the training's score models (eval/behaviour.py).

def behaviour_plan(cfg, prompts) -> tuple[dict[str, str], dict[str, list[int]], list]:
    """What the behaviour section covers: (suite → kind, eval-derived suite → prompt ids,
    extra suites to sample).

    The evaluation prompts whose file marks them `harmful` true/false (the demo prompts) form
    the suites "harmful" and "benign" on the samples the evaluation draws anyway; the suites of
    `cfg.behaviour_suites` (default: "borderline" for the demo prompts) are sampled on top,
    except one named like an eval-derived suite (that one wins).

    Raises
    ------
    InputError
        A bad suite spec or file, or an unknown detector (`cfg.behaviour_detector`).
    """
    from ..eval.behaviour import eval_prompt_kinds, load_detector, parse_suite_specs, suite_specs_setting

    source = cfg.eval_prompts or cfg.prompts
    load_detector(getattr(cfg, "behaviour_detector", "phrases"))  # checked now, used after sampling
    kinds = eval_prompt_kinds(source, cfg.prompt_column, prompts)
    derived = {k: [i for i, x in enumerate(kinds) if x == k] for k in ("harmful", "benign")}
    derived = {k: ids for k, ids in derived.items() if ids}
    specs = suite_specs_setting(getattr(cfg, "behaviour_suites", None), source)
    extra = [s for s in parse_suite_specs(specs, field="behaviour_suites") if s.name not in derived]
    return {**{k: k for k in derived}, **{s.name: s.kind for s in extra}}, derived, extra


def _behaviour_samples(run: Path, model, tokenizer, plan, cfg, key: str, model_name: str, force: bool) -> dict:
    """One model's samples of the plan's extra suites, in run/eval/behaviour/<suite>/<key>/, with
    the evaluation's generation settings, samples per prompt and `max_eval_prompts`."""
    from ..eval.behaviour import sample_suites

    return sample_suites(Path(run) / "eval" / "behaviour", model, tokenizer, plan[2], cfg, model_key=key,
                         model_name=model_name, num_samples=cfg.eval_num_samples,
                         limit=cfg.max_eval_prompts or None, force=force)


def behaviour_section(eval_paths: dict, behaviour_paths: dict, plan, cfg, *, force: bool = False) -> dict:
    """eval.json's `behaviour`: every model (`eval_paths`: name → its eval samples) on the
    eval-derived suites and on the extra ones (`behaviour_paths`: name → suite → samples)."""
    from ..eval.behaviour import behaviour_from_samples, load_detector

    suite_kinds, derived, _ = plan
    paths = {(suite, m): p for suite in derived for m, p in eval_paths.items()}
    paths.update({(suite, m): p for m, d in behaviour_paths.items() for suite, p in d.items()})
    return behaviour_from_samples(paths, suite_kinds, load_detector(getattr(cfg, "behaviour_detector", "phrases")),
                                  subsets=derived, seed=cfg.seed, force=force)
