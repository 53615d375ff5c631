"""The stages of MoCAN and PeCAN, wired by the short recipes in `mocan.py` and `pecan.py`; the
evaluate stage is in `evaluate.py`.

Each stage function takes the run directory and what it needs, writes its artifacts there
atomically, records its inputs' digest (`run.mark_done`; a rerun finds a stage whose inputs
have not changed current and skips it) and returns what the next stage needs. Which stages a
call runs, the lock, config.json and the timings are `run.Run`'s; the stages take the
pipeline's config (`config.PipelineConfig`) for their settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .run import is_current, mark_done, stage_key
from .scoring import safety_columns

if TYPE_CHECKING:
    from .dual_stage import DualRecord, HeldOutPrediction

STAGES = ("sample", "score", "dual", "pairs", "train", "evaluate", "report")


def model_ident(spec, run: Path | None = None, weights: Path | None = None) -> str:
    """A model's identity in cached provenance: `spec@digest` for a local folder, the digest
    of `weights` or else of the folder's weights file (retrained weights change it); else
    `spec`. A folder under `run` is named relative to it, so a run directory moved or
    copied elsewhere keeps its caches."""
    from ..runio import file_digest

    p = Path(spec)
    if weights is None:
        names = ("model/adapter_model.safetensors", "adapter_model.safetensors", "model/model.safetensors",
                 "model.safetensors", "config.json")
        weights = next((p / f for f in names if (p / f).exists()), None)
    if weights is None:
        return str(spec)
    label = str(spec)
    if run is not None and p.resolve().is_relative_to(Path(run).resolve()):
        label = p.resolve().relative_to(Path(run).resolve()).as_posix()
    return f"{label}@{file_digest(weights)}"


# ----------------------------------------------------------------------------- stage functions

def sample_stage(run: Path, model, tokenizer, prompts, cfg, *, subdir: str = "", model_name: str,
                 num_samples: int, force: bool = False):
    """Sample `num_samples` responses per prompt into `run/subdir/samples.parquet` (resumable)."""
    import shutil

    from ..models.generation import PARTIAL_DIR, SAMPLES_FILE, sample
    from ..runio import dist_info

    out = Path(run) / subdir
    # under a distributed launch rank 0 alone clears the old files, before `sample` lets the
    # other ranks in: a late rank deleting them would take the parts rank 0 has written
    if force and dist_info().rank == 0:
        (out / SAMPLES_FILE).unlink(missing_ok=True)
        shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
    sample(model, tokenizer, prompts, num_samples=num_samples, max_new_tokens=cfg.max_new_tokens,
           temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
           batch_size=cfg.sample_batch_size, model_name=model_name, out_dir=out)
    return out / SAMPLES_FILE


def score_stage(samples_path: Path, jobs, *, force: bool = False, log=print):
    """Score samples into scores.parquet next to them; returns the table."""
    import shutil

    from .scoring import partial_dir, score_samples

    out = Path(samples_path).parent / "scores.parquet"
    if force:
        out.unlink(missing_ok=True)
        shutil.rmtree(partial_dir(out), ignore_errors=True)  # an interrupted scoring's parts too
    return score_samples(samples_path, jobs, out, log=log)


def resolve_margins(arrays, beta: float, margins: dict, fraction: float,
                    max_unsafe_rate: dict | None = None) -> list[float]:
    """Margins per constraint: given ones as is; a constraint with a maximum unsafe rate r gets
    the margin on g = −1{unsafe} that states it, π_ref's unsafe rate − r
    (`dualign.dual.margin_for_unsafe_rate`); the others `fraction` × largest achievable gain.

    Raises
    ------
    InputError
        A constraint with both a margin and a rate, or a rate outside [0, 1].
    InfeasibleMarginError
        A rate below the smallest reachable one (which the message gives).
    """
    from ..dual import DualProblem, margin_for_unsafe_rate
    from ..errors import InputError

    rates = max_unsafe_rate or {}
    both = sorted(set(rates) & set(margins))
    if both:
        raise InputError(f"constraint(s) {', '.join(both)} have both a margin and a max_unsafe_rate: give one",
                         field="max_unsafe_rate")
    mg = DualProblem(arrays.reward, arrays.safety, beta, 0.0).max_gain()
    out = []
    for j, col in enumerate(arrays.safety_names):
        name = col.split("/", 1)[-1]
        if name in rates:
            out.append(margin_for_unsafe_rate(arrays.safety[:, :, j], rates[name], col))
        else:
            out.append(float(margins[name]) if name in margins else float(np.round(fraction * mg[j], 4)))
    return out


def dual_stage(run: Path, scores, safety_cols, cfg, *, force: bool = False, log=print,
               sign_means_unsafe: bool = True) -> DualRecord:
    """Solve the dual on the scored samples → dual.json and figures/ (skipped when current);
    returns its `DualRecord`, solved or read back.

    The settings come from `cfg` (a `PipelineConfig`): `beta`, `margins`, `margin_fraction`
    (`resolve_margins`), `bootstrap` (replicates), `seed` and `max_unsafe_rate` (constraint
    name → largest unsafe rate allowed, instead of a margin: the dual then runs on
    −1{unsafe} for that constraint, and λ* applies to that indicator).
    `sign_means_unsafe=False`: safety scores without a meaningful sign (as `solve_dual_stage`).

    Raises
    ------
    InputError
        Rates with `sign_means_unsafe=False`, or as `resolve_margins`.
    InfeasibleMarginError
        As `resolve_margins` and `solve_dual_stage`."""
    from ..data.scores import scores_to_arrays
    from ..dual import unsafe_rate
    from ..errors import InputError
    from ..runio import array_digest
    from .dual_stage import DualRecord, format_dual_summary, solve_dual_stage, write_dual_outputs

    run = Path(run)
    beta, margins, fraction, n_boot, seed = cfg.beta, cfg.margins, cfg.margin_fraction, cfg.bootstrap, cfg.seed
    rates = dict(cfg.max_unsafe_rate or {})
    if rates and not sign_means_unsafe:
        raise InputError("these safety scores have no meaningful sign (PeCAN's implicit β·log π_g/π_ref), so no "
                         "unsafe rate: state the constraint as a margin", field="max_unsafe_rate")
    arrays = scores_to_arrays(scores, "reward", safety_cols, source=str(run / "scores.parquet"))
    resolved = resolve_margins(arrays, beta, margins, fraction, rates)
    per_col = [rates.get(c.split("/", 1)[-1]) for c in arrays.safety_names]
    # the rates join the key only when given, so runs without them keep their cached dual
    key = stage_key(array_digest(arrays.reward, arrays.safety), beta, resolved, n_boot, seed,
                    *([per_col] if rates else []))
    if not force and is_current(run, "dual", key):
        d = DualRecord.read(run / "dual.json")
    else:
        for j, (name, m, c) in enumerate(zip(safety_cols, resolved, arrays.safety_names)):
            if per_col[j] is not None:
                log(f"max unsafe rate for {name}: {per_col[j]:g} (π_ref's on the samples "
                    f"{unsafe_rate(arrays.safety[:, :, j]):.4g}: margin {m:.4g} on −1{{unsafe}})")
                continue
            src = "given" if c.split("/", 1)[-1] in margins else f"{fraction:g} × largest achievable gain"
            log(f"margin for {name}: {m:g} ({src})")
        d = solve_dual_stage(arrays, beta, resolved, n_boot=n_boot, seed=seed, sign_means_unsafe=sign_means_unsafe,
                             max_unsafe_rate=per_col)
        write_dual_outputs(d, arrays, run / "dual.json", run / "figures")
        mark_done(run, "dual", key, ["dual.json"])
    log(format_dual_summary(d))
    return d


def pairs_stage(run: Path, pairs, lam, safety_cols, *, key: str, scale: float = 1.0, force: bool = False,
                dual: DualRecord | None = None):
    """Label pairs with λ* → pairs.parquet and the TRL export pairs_trl.jsonl.

    `scale` multiplies the score difference inside σ (1: the consistent label; PeCAN's
    label_scale="paper" passes 1/β). `dual` is the dual record λ* comes from: a
    constraint of kind "max_unsafe_rate" there was solved on g = −1{unsafe}, so its λ*
    multiplies that indicator of the safety column, not the raw score (`rate_constraints`);
    without `dual`, every λ* multiplies its raw score.

    Raises
    ------
    ValueError
        A safety column `dual` has no constraint for."""
    import pandas as pd

    from ..runio import atomic_path, write_parquet
    from .pairs import label_pairs, rate_constraints, trl_export

    run = Path(run)
    indicator = rate_constraints(dual, safety_cols) if dual is not None else [False] * len(safety_cols)
    # which λ* multiply −1{unsafe} changes every label; it joins the key only when some do, so
    # runs without rate constraints keep their cached pairs
    parts = [list(lam)] + ([scale] if scale != 1.0 else []) + \
        ([{"max_unsafe_rate": indicator}] if any(indicator) else [])
    key = stage_key(key, *parts)
    if not force and is_current(run, "pairs", key):
        return pd.read_parquet(run / "pairs.parquet")
    labeled = label_pairs(pairs, lam, "reward", safety_cols, scale=scale, indicator=indicator)
    write_parquet(labeled, run / "pairs.parquet")
    with atomic_path(run / "pairs_trl.jsonl") as tmp:
        trl_export(labeled).to_json(tmp, orient="records", lines=True, force_ascii=False)
    mark_done(run, "pairs", key, ["pairs.parquet", "pairs_trl.jsonl"])
    return labeled


def train_config(run: Path, cfg):
    """The `PreferenceConfig` of the one-shot training: `cfg.train` at `cfg.beta`, output in run/train."""
    from ..train.preference import PreferenceConfig

    return PreferenceConfig.from_dict({**cfg.train, "beta": cfg.beta, "output_dir": str(Path(run) / "train")})


def tokenization_of(tcfg) -> dict:
    """The keyword arguments of `scoring.logprob_columns` that tokenize as the training with
    `PreferenceConfig` `tcfg` does (template, EOS, truncation; its reference batch size), so
    its log-probs are the ones the training saw."""
    return dict(template=tcfg.template, append_eos=tcfg.append_eos, max_length=tcfg.max_length,
                batch_size=tcfg.ref_batch_size)


def train_stage(run: Path, policy, tokenizer, pairs, cfg, metadata: dict, *, force: bool = False):
    """One-shot training of `policy` (π_ref, left as it is) on the labeled pairs, with
    `cfg.train` at `cfg.beta` (resumes from checkpoints in run/train) → `TrainResult`, whose
    `model` is the trained policy."""
    from ..train.preference import train_preferences

    tcfg = train_config(run, cfg)
    # precomputed reference log-probs (PeCAN has them from its implicit scores) save a pass
    cols = ["prompt", "response_0", "response_1", "label"] + [c for c in ("ref_logp_0", "ref_logp_1")
                                                              if c in pairs.columns]
    # changed pairs or settings make an earlier training stale: "auto" starts it over
    return train_preferences(policy, tokenizer, pairs[cols], tcfg, resume="auto" if not force else False,
                             metadata=metadata)


def reference_eval_samples(run: Path, ref_model, tokenizer, prompts, cfg, base_spec: str, *,
                           force: bool = False) -> Path:
    """π_ref's samples of the evaluation prompts (run/eval/reference/samples.parquet), with the
    evaluation's settings and `cfg.reference_eval_count()` responses per prompt. Drawn before
    training for the held-out prediction, and found current by the evaluate stage."""
    return sample_stage(run, ref_model, tokenizer, prompts, cfg, subdir="eval/reference", model_name=base_spec,
                        num_samples=cfg.reference_eval_count(), force=force)


def held_out_prediction_of(ref_scores, dual: DualRecord, reward_col: str, safety_cols, *,
                           seed: int = 0) -> HeldOutPrediction | None:
    """`held_out_prediction` of dual record `dual` on the scored reference samples of the
    evaluation prompts; None where the dual's constraints are not these safety columns, or
    the prompts have fewer than 2 samples each (a tilt needs two)."""
    from ..data.scores import scores_to_arrays
    from .dual_stage import held_out_prediction

    if dual.names != list(safety_cols):
        return None
    arrays = scores_to_arrays(ref_scores, reward_col, list(safety_cols), source="eval/reference/scores.parquet")
    if arrays.reward.shape[1] < 2:
        return None
    return held_out_prediction(dual, arrays, seed=seed)


def learned_tilt_of(ref_scores, dual: DualRecord, reward_col: str, safety_cols, policy_col: str, ref_col: str, *,
                    seed: int = 0):
    """`dual_stage.learned_tilt_on` of the scored reference samples of the evaluation prompts,
    whose columns `policy_col` and `ref_col` hold log π_θ and log π_ref of each sample; None
    under the conditions of `held_out_prediction_of` (other constraints, fewer than 2 samples)."""
    from ..data.scores import scores_to_arrays
    from .dual_stage import learned_tilt_on

    if dual.names != list(safety_cols):
        return None
    source = "eval/reference/scores.parquet"
    arrays = scores_to_arrays(ref_scores, reward_col, list(safety_cols), source=source)
    if arrays.reward.shape[1] < 2:
        return None
    # the same pivot (rows by prompt, then sample id) for the log-ratio as for the scores
    ratio = ref_scores.assign(_logratio=ref_scores[policy_col] - ref_scores[ref_col])
    logratio = scores_to_arrays(ratio, "_logratio", list(safety_cols), source=source).reward
    return learned_tilt_on(dual, arrays, logratio, seed=seed)


def held_out_prediction_line(h: HeldOutPrediction) -> str:
    """One line: the predicted gains on the held-out prompts, with CIs, and the KL (a lower
    bound when at its log K ceiling, `at_sample_ceiling`)."""
    from ..eval.report import at_sample_ceiling

    k = h.n_samples_per_prompt
    gains = [f"reward {h.reward_gain:+.3f} [{h.reward_gain_ci[0]:+.3f}, {h.reward_gain_ci[1]:+.3f}]"]
    gains += [f"{c} {g:+.3f} [{h.safety_gain_ci[c][0]:+.3f}, {h.safety_gain_ci[c][1]:+.3f}]"
              for c, g in h.safety_gain.items()]
    at_ceiling = at_sample_ceiling(h.kl, k)
    return (f"predicted on the {h.n_prompts} held-out prompts (λ* on π_ref's {k} samples "
            f"of each): " + ", ".join(gains) + f"; KL {'≥ ' if at_ceiling else ''}{h.kl:.3f} nats"
            + (f" (at its ceiling log {k})" if at_ceiling else ""))


def held_out_stage(run: Path, policy, tokenizer, prompts, jobs, dual: DualRecord, cfg, *,
                   log=print) -> HeldOutPrediction | None:
    """What λ* predicts on the held-out prompts, before any training: π_ref's samples of them
    (`reference_eval_samples`, which the evaluate stage finds current), scored by `jobs`,
    tilted by λ* (`held_out_prediction_of`), logged. None with fewer than 2 reference samples
    per prompt (a tilt needs two)."""
    if cfg.reference_eval_count() < 2:
        return None
    samples = reference_eval_samples(run, policy, tokenizer, prompts, cfg, cfg.policy)
    safety_cols = safety_columns(jobs)
    held_out = held_out_prediction_of(score_stage(samples, jobs, log=log), dual, "reward", safety_cols,
                                      seed=cfg.seed)
    if held_out is not None:
        log("  " + held_out_prediction_line(held_out))
    return held_out


def report_stage(run: Path, config: dict, dual: DualRecord, record: dict, notes: list[str] = ()) -> Path:
    """report.md (with `notes` under its title) and the before/after figure."""
    import pandas as pd

    from ..eval.figures import plot_before_after
    from ..eval.report import write_report

    run = Path(run)
    ref = pd.read_parquet(run / "eval" / "reference" / "scores.parquet")
    trained = pd.read_parquet(run / "eval" / "trained" / "scores.parquet")
    plot_before_after(ref, trained, list(record["scores"]), run / "figures" / "before_after.png")
    return write_report(run, config, dual, record, notes)
