"""PeCAN (docs/design.md §4): preference-based one-shot safety alignment, no reward or cost model.

    pre-align DPO_H (π_r) and DPO_S (π_g) → sample π_ref → implicit scores
    r̂ = β log π_r/π_ref, ĝ = β log π_g/π_ref → solve the dual (λ*) → pseudo-preference
    pairs σ(Δr̂ + λ*ᵀΔĝ) → train once → evaluate (with DPO_H and DPO_S) → report

The stages after pre-alignment are MoCAN's (`stages`), with the score models replaced by
log-ratios of the pre-aligned policies (`implicit`). Each stage is skipped when its inputs
are unchanged; `start` forces a stage (and all later ones) to rerun, `stop` ends after a
stage.

Label scale. The paper's code labels pairs with σ(Δ log π_r/π_ref + λᵀΔ log π_g/π_ref),
i.e. without the β of r̂ = β log π_r/π_ref. Trained with the β-DPO loss, that label's
optimum is π_ref exp((r̂ + λᵀĝ)/β²), not the π_λ = π_ref exp((r̂ + λᵀĝ)/β) the dual solved
for; `label_scale="consistent"` (default) is the consistent target — with λ* = 0 it is π_r
itself — and `"paper"` reproduces the paper's code.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.preferences import load_preferences
from ..data.prompts import config_prompts
from ..models.loading import load_policy, load_tokenizer
from ..parallel import rank_device
from ..runio import file_digest, write_parquet
from . import stages as S
from .config import PeCANConfig
from .evaluate import EvalPlan, evaluate_stage
from .implicit import add_implicit_columns
from .pairs import dataset_as_samples, pairs_from_samples, pairs_from_scored_dataset
from .run import Run, is_current, mark_done, stage_key
from .scoring import REF, LogProbModel, logprob_columns, score_jobs

__all__ = ["PeCANConfig", "run_pecan", "STAGES"]

STAGES = ("pre_align",) + S.STAGES
HELPFUL = "helpful"


def run_pecan(cfg: PeCANConfig, start: str | None = None, stop: str | None = None, log=print) -> Path:
    """Run (or resume) PeCAN in `cfg.out`; returns the run directory."""
    with Run(cfg, STAGES, start, stop, log) as run:
        # every file is read and checked (and every scorer sign) before any model loads
        jobs = [j._replace(column=f"scorer/{j.column}") for j in score_jobs(cfg.reward, cfg.safety)] \
            if cfg.reward or cfg.safety else []
        sets = preference_sets(cfg)
        names = list(cfg.safety_sources())
        safety_cols = [f"safety/{n}" for n in names]
        prompts, eval_prompts = config_prompts(cfg), config_prompts(cfg, evaluation=True)
        align = pre_align_config(cfg)
        tokenization = S.tokenization_of(align)

        run.begin("pre_align", f"[1/8 pre-align] DPO_H on helpfulness, DPO_S on {', '.join(names)} (β = {cfg.beta})")
        source = reference_logps_of_pairs(run.dir, cfg, sets, tokenization, force=run.force("pre_align"), log=log)
        policies = pre_align_stage(run.dir, cfg, sets, ref_logps=source, force=run.force("pre_align"), log=log)

        run.begin("sample", f"[2/8 sample] {len(prompts)} prompts × {cfg.num_samples} responses from {cfg.policy}")
        implicit = ImplicitScores(logprob_models(cfg.policy, policies, run.dir), implicit_policies(names), cfg.beta,
                                  tokenization, log)
        # under torchrun / accelerate launch each rank takes its own GPU (cuda:LOCAL_RANK), not all
        # cuda:0; one process: the default device. π_ref stays π_ref: training returns a new model
        policy, tok = load_policy(cfg.policy, device=rank_device(None))
        samples = S.sample_stage(run.dir, policy, tok, prompts, cfg, model_name=cfg.policy,
                                 num_samples=cfg.num_samples, force=run.force("sample"))
        run.begin("score", "[3/8 score] implicit scores r̂ = β log π_r/π_ref, ĝ = β log π_g/π_ref of every sample")
        scores = implicit([samples], run.force("score"))[0]
        run.begin("dual", "[4/8 dual] λ* and what π_λ* will do, before any training")
        dual = S.dual_stage(run.dir, scores, safety_cols, cfg, force=run.force("dual"), log=log,
                            sign_means_unsafe=False)  # ĝ is defined up to a per-prompt constant

        scale = 1.0 if cfg.label_scale == "consistent" else 1.0 / cfg.beta
        label = "Δr̂ + λ*ᵀΔĝ" if scale == 1 else "(Δr̂ + λ*ᵀΔĝ)/β"
        run.begin("pairs", f"[5/8 pairs] pseudo-preference labels σ({label}) on pairs from {cfg.pairs}")
        pairs, key = pairs_to_label(run, scores, implicit, source, align)
        pairs = S.pairs_stage(run.dir, pairs, dual.lam, safety_cols, key=key, scale=scale, force=run.force("pairs"))
        run.begin("train", f"[6/8 train] one-shot training on {len(pairs)} pairs (β = {cfg.beta})")
        meta = {"method": "pecan", "base_model": cfg.policy, "lambda": list(dual.lam), "margins": list(dual.margins),
                "beta": cfg.beta, "label_scale": cfg.label_scale, "data": cfg.pairs,
                "scores": {c: f"implicit: β·log π/π_ref of {policies[r]}" for c, r in implicit_policies(names).items()}}
        result = S.train_stage(run.dir, policy, tok, pairs, cfg, meta, force=run.force("train"))
        run.begin("evaluate", f"[7/8 evaluate] π_ref, PeCAN, DPO_H and DPO_S on {len(eval_prompts)} held-out prompts")
        record = evaluate_stage(run.dir, result, (policy, tok), eval_prompts, jobs, cfg, method="pecan", dual=dual,
                                plan=eval_plan(run, implicit, jobs, policies, names), force=run.force("evaluate"),
                                log=log)
        run.begin("report", "[8/8 report]")
        S.report_stage(run.dir, cfg.to_dict(), dual, record, notes=report_notes(cfg, policies, names))
    return run.dir


def implicit_policies(names: list[str]) -> dict[str, str]:
    """Implicit score column → the pre-aligned policy it is the log-ratio of: `reward` → DPO_H
    ("helpful"), `safety/<name>` → DPO_S of that constraint ("safety_<name>")."""
    return {"reward": HELPFUL, **{f"safety/{n}": f"safety_{n}" for n in names}}


@dataclass(frozen=True)
class ImplicitScores:
    """PeCAN's scores of samples files: the `logp/` columns of π_ref and every pre-aligned
    policy (`models`, tokenized as pre-alignment trained: `tokenization`), then
    r̂ = β log π_r/π_ref and ĝ = β log π_g/π_ref (`add_implicit_columns`, columns per `policy_of`).

    Called as `implicit(paths, force)` → the scores table of each samples file."""

    models: list
    policy_of: dict
    beta: float
    tokenization: dict
    log: object = print

    def __call__(self, paths, force: bool = False) -> list[pd.DataFrame]:
        logprob_columns(paths, self.models, force=force, log=self.log, **self.tokenization)
        return [add_implicit_columns(p, self.policy_of, self.beta) for p in paths]


def pairs_to_label(run: Run, scores, implicit: ImplicitScores, source: Path | None, align):
    """The pairs PeCAN labels, with their implicit scores, and the digest of those (the pairs
    stage's key): π_ref's samples paired (`pairs: samples`), the preference pairs whose π_ref
    log-probs pre-alignment computed (`source`, `pairs: preferences`), or another preference
    file's pairs (in run/pairs_source/). Preference pairs carry π_ref's log-probs as the
    training's reference log-probs when pre-alignment and training tokenize alike."""
    cfg = run.cfg
    if cfg.pairs == "samples":
        return pairs_from_samples(scores, cfg.pairs_per_prompt, cfg.seed), file_digest(run.dir / "scores.parquet")
    if cfg.pairs != "preferences":  # another file to relabel (else: the pairs scored above)
        source = run.dir / "pairs_source" / "samples.parquet"
        _write_if_changed(dataset_as_samples(load_preferences(cfg.pairs, limit=cfg.max_pairs or None)), source)
    pairs = pairs_from_scored_dataset(implicit([source], run.force("pairs"))[0])
    if same_tokenization(align, S.train_config(run.dir, cfg)):
        # π_ref's log-probs of the pairs are already here: training needs no pass of its own
        pairs["ref_logp_0"], pairs["ref_logp_1"] = pairs[f"logp/{REF}_0"], pairs[f"logp/{REF}_1"]
    return pairs, file_digest(source.with_name("scores.parquet"))


def eval_plan(run: Run, implicit: ImplicitScores, jobs, policies: dict[str, str], names: list[str]) -> EvalPlan:
    """PeCAN's evaluation: every model's implicit scores (and the evaluation-only scorers'
    `scorer/…` columns when given), ĝ compared without a sign, and DPO_H and DPO_S sampled
    next to π_ref and the trained model, each with its KL from its own log-prob column."""
    scorer_cols = [j.column for j in jobs]
    safety_cols = [f"safety/{n}" for n in names]
    return EvalPlan(
        score=partial(_implicit_and_scorers, implicit, jobs, run.log),
        reward_cols=("reward", *[c for c in scorer_cols if c == "scorer/reward"]),
        safety_cols=(*safety_cols, *[c for c in scorer_cols if c != "scorer/reward"]),
        unsigned_cols=tuple(safety_cols), baselines=baseline_loaders(run.cfg.policy, policies, names, run.dir),
        baseline_logps={"dpo_h": f"logp/{HELPFUL}", **{_dpo_s_name(n, names): f"logp/safety_{n}" for n in names}})


def _implicit_and_scorers(implicit: ImplicitScores, jobs, log, paths, force: bool) -> list[pd.DataFrame]:
    """Implicit scores of `paths`, then the evaluation-only scorers' columns when any."""
    tables = implicit(paths, force)
    return [S.score_stage(p, jobs, force=force, log=log) for p in paths] if jobs else tables


# ----------------------------------------------------------------------------- preference sets

def preference_sets(cfg: PeCANConfig) -> dict[str, tuple[pd.DataFrame | None, str, str]]:
    """Policy name → (normalized preference table or None, label, checkpoint or "").

    "helpful" reads `better_response_id`; "safety_<name>" reads `safer_response_id` (a
    PKU file without it raises an InputError naming the file, and the record and field
    when one record lacks it). The table is None where only a checkpoint is given; with a
    checkpoint and a file, the file's pairs are still relabeled.
    """
    limit = cfg.max_pairs or None
    out = {}
    hf = cfg.helpful_source()
    out[HELPFUL] = (load_preferences(hf, limit=limit) if hf else None, "better", cfg.helpful_model)
    for name, f in cfg.safety_sources().items():
        out[f"safety_{name}"] = (load_preferences(f, require_safety=not cfg.safety_models.get(name), limit=limit)
                                 if f else None, "safer", cfg.safety_models.get(name, ""))
    return out


def dpo_pairs(prefs: pd.DataFrame, label: str) -> pd.DataFrame:
    """Plain-DPO pairs of one preference label ("better" or "safer"): label 1.0 when
    response 1 is preferred, else 0.0."""
    ids = prefs[f"{label}_response_id"].to_numpy()
    out = prefs[["prompt", "response_0", "response_1"]].copy()
    out["label"] = (ids == 1).astype(np.float64)
    return out


def distinct_pairs(sets) -> pd.DataFrame:
    """Every distinct (prompt, response_0, response_1) of the preference tables in `sets`:
    the pairs PeCAN relabels with `pairs: preferences` (as in the paper, which relabels
    PKU-SafeRLHF)."""
    tables = [t[["prompt", "response_0", "response_1"]] for t, _, _ in sets.values() if t is not None]
    if not tables:
        return pd.DataFrame(columns=["prompt", "response_0", "response_1"])
    return pd.concat(tables, ignore_index=True).drop_duplicates(ignore_index=True)


def reference_logps_of_pairs(run: Path, cfg: PeCANConfig, sets, tokenization: dict, *,
                             force: bool = False, log=print) -> Path | None:
    """π_ref's log-probs (`logp/ref`) of every distinct preference pair, computed once: the
    reference log-probs of DPO_H, of every DPO_S and, with `pairs: preferences`, of the
    one-shot training. Returns the pairs' samples file (`dataset_as_samples`; its
    scores.parquet holds the column), in `pairs_source/` when those are the pairs PeCAN
    relabels; None without preference files."""
    union = distinct_pairs(sets)
    if not len(union):
        return None
    source = Path(run) / ("pairs_source" if cfg.pairs == "preferences" else "pre_align/pairs") / "samples.parquet"
    _write_if_changed(dataset_as_samples(union), source)
    logprob_columns([source], logprob_models(cfg.policy, {}), force=force, log=log, **tokenization)
    return source


def _write_if_changed(df: pd.DataFrame, path: Path) -> None:
    """Write a samples table unless the file already holds it (its digest keys cached log-probs)."""
    if path.exists():
        old = pd.read_parquet(path)
        if old.shape == df.shape and old.reset_index(drop=True).equals(df.reset_index(drop=True)):
            return
    write_parquet(df, path)


# ----------------------------------------------------------------------------- pre-alignment

def pre_align_config(cfg: PeCANConfig, output_dir: str = ""):
    """DPO_H/DPO_S training settings: `train`, overridden by `pre_align`, at the run's β."""
    from ..train.preference import PreferenceConfig

    return PreferenceConfig.from_dict({**cfg.train, **cfg.pre_align, "beta": cfg.beta,
                                       **({"output_dir": output_dir} if output_dir else {})})


def pre_align_stage(run: Path, cfg: PeCANConfig, sets, *, ref_logps=None, force: bool = False,
                    log=print) -> dict[str, str]:
    """Train (or reuse) one plain-DPO policy per preference set → name → model folder.

    Each lands in `run/pre_align/<name>/model` ("helpful", "safety_<constraint>"), resuming
    from checkpoints like any training; a finished one is skipped when its data and
    settings are unchanged. `ref_logps`: a samples file of the pairs (`dataset_as_samples`)
    whose scores.parquet holds `logp/ref`, used as the trainings' reference log-probs.
    """
    from ..runio import array_digest
    from ..train.preference import train_preferences

    out = {}
    for name, (prefs, label, ckpt) in sets.items():
        if ckpt:
            out[name] = str(ckpt)
            log(f"{name}: reusing {ckpt}")
            continue
        tcfg = pre_align_config(cfg, str(Path(run) / "pre_align" / name))
        pairs = dpo_pairs(prefs, label)
        if ref_logps is not None:
            pairs = _with_ref_logps(pairs, Path(ref_logps))
        digest = array_digest(pairs["label"].to_numpy(), np.frombuffer(
            "\x00".join(pairs[["prompt", "response_0", "response_1"]].to_numpy().ravel()).encode(), np.uint8))
        settings = {k: v for k, v in tcfg.to_dict().items() if k != "output_dir"}  # a moved run stays current
        key = stage_key(digest, cfg.policy, settings)
        rel = f"pre_align/{name}/model"
        out[name] = str(Path(run) / rel)
        if not force and is_current(run, f"pre_align_{name}", key):
            continue
        log(f"{name}: plain DPO on {len(pairs)} pairs ({label}_response_id)")
        # on this rank's GPU under a launch; loaded here, since the run's π_ref loads only for sampling
        model, tok = load_policy(cfg.policy, device=rank_device(None))
        meta = {"method": "dpo_h" if name == HELPFUL else "dpo_s", "base_model": cfg.policy,
                "beta": cfg.beta, "data": prefs.attrs.get("source"), "label": f"{label}_response_id"}
        train_preferences(model, tok, pairs, tcfg, resume="auto" if not force else False, metadata=meta)
        mark_done(run, f"pre_align_{name}", key, [rel])
    return out


def _with_ref_logps(pairs: pd.DataFrame, samples_path: Path) -> pd.DataFrame:
    """`pairs` plus ref_logp_0/ref_logp_1, looked up in the scored `dataset_as_samples` table."""
    scored = pairs_from_scored_dataset(pd.read_parquet(samples_path.with_name("scores.parquet")))
    keys = ["prompt", "response_0", "response_1"]
    lp = scored[keys + [f"logp/{REF}_0", f"logp/{REF}_1"]].drop_duplicates(keys)
    out = pairs.merge(lp, on=keys, how="left", validate="many_to_one")
    return out.rename(columns={f"logp/{REF}_0": "ref_logp_0", f"logp/{REF}_1": "ref_logp_1"})


def load_checkpoint(spec: str, base: str):
    """(model, tokenizer) of a pre-aligned policy: a dualign adapter/full-weights folder
    (or the training folder holding it in `model/`), or any `load_policy` spec. The
    tokenizer is always the reference's, so every log-prob tokenizes alike."""
    from ..train.preference import MODEL_DIRNAME, load_trained

    p = Path(spec)
    if (p / MODEL_DIRNAME).is_dir():
        p = p / MODEL_DIRNAME
    if (p / "adapter_config.json").exists():
        model = load_trained(p, base_model=base)[0]
    else:
        model = load_policy(str(spec))[0]
    return model, load_tokenizer(base)


def logprob_models(base: str, policies: dict[str, str], run: Path | None = None) -> list[LogProbModel]:
    """π_ref (`logp/ref`) and every pre-aligned policy (`logp/<name>`); checkpoints under
    `run` are named relative to it (`stages.model_ident`)."""
    models = [LogProbModel(REF, base, lambda: load_policy(base))]
    for name, path in policies.items():
        models.append(LogProbModel(name, S.model_ident(path, run), lambda p=path: load_checkpoint(p, base)))
    return models


def baseline_loaders(base: str, policies: dict[str, str], names: list[str], run: Path | None = None) -> dict:
    """eval name → loader of (model, tokenizer, model name): "dpo_h", and "dpo_s" (one
    constraint) or "dpo_s_<name>" (several)."""
    def loader(path):
        return lambda: (*load_checkpoint(path, base), S.model_ident(path, run))

    out = {"dpo_h": loader(policies[HELPFUL])}
    for n in names:
        out[_dpo_s_name(n, names)] = loader(policies[f"safety_{n}"])
    return out


def _dpo_s_name(name: str, names: list[str]) -> str:
    return "dpo_s" if len(names) == 1 else f"dpo_s_{name}"


def same_tokenization(a, b) -> bool:
    """Whether two PreferenceConfigs tokenize pairs identically (then log-probs carry over)."""
    return (a.template, a.append_eos, a.max_length) == (b.template, b.append_eos, b.max_length)


def report_notes(cfg: PeCANConfig, policies: dict[str, str], names: list[str]) -> list[str]:
    """What PeCAN's score columns mean, for report.md."""
    notes = [f"PeCAN: no reward or cost model in training. `reward` is the implicit score β·log π_r/π_ref of "
             f"DPO_H (`{policies[HELPFUL]}`); "
             + "; ".join(f"`safety/{n}` is β·log π_g/π_ref of DPO_S (`{policies[f'safety_{n}']}`)" for n in names)
             + ". Both are defined up to a prompt-only constant, which cancels in every gain below."]
    if cfg.reward or cfg.safety:
        notes.append("`scorer/…` columns come from the reward/cost models given for evaluation only "
                     f"({', '.join(filter(None, [cfg.reward, *cfg.safety.values()]))}).")
    notes.append("Labels: " + ("σ(Δr̂ + λ*ᵀΔĝ) (label_scale = consistent: the DPO optimum is π_λ*, the policy the "
                               "dual's predictions describe)." if cfg.label_scale == "consistent" else
                               "σ((Δr̂ + λ*ᵀΔĝ)/β) (label_scale = paper, as in the paper's code: the optimum "
                               "is π_ref·exp((r̂ + λ*ᵀĝ)/β²), sharper than π_λ*; the predictions below are "
                               "for π_λ*)."))
    return notes
