"""Stage bookkeeping for a run directory: skip a stage whose inputs have not changed.

Each finished stage leaves `stages/<name>.json` with the digest of everything it read
(settings and upstream digests) and the files it wrote. A stage is current when that
record matches and its outputs exist, so rerunning a killed or finished pipeline redoes
only what is missing or stale.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..runio import write_json

if TYPE_CHECKING:
    from .dual_stage import DualRecord, HeldOutPrediction

STAGES = ("sample", "score", "dual", "pairs", "train", "evaluate", "report")


def stage_key(*parts) -> str:
    """A digest of JSON-serializable parts (settings, upstream keys, file digests)."""
    from ..runio import digest

    return digest(parts)


def is_current(run: Path, name: str, key: str) -> bool:
    rec = Path(run) / "stages" / f"{name}.json"
    if not rec.exists():
        return False
    d = json.loads(rec.read_text())
    return d.get("key") == key and all((Path(run) / o).exists() for o in d.get("outputs", []))


def mark_done(run: Path, name: str, key: str, outputs: list[str]) -> None:
    write_json({"stage": name, "key": key, "outputs": outputs}, Path(run) / "stages" / f"{name}.json")


class StageClock:
    """Wall time of each stage of one pipeline call, in seconds, kept in `timings.json` in the
    run directory (rewritten atomically as each stage ends, so a killed run keeps the stages
    it finished). A stage found current and skipped shows up with its (short) checking time.

    Use: `clock = StageClock(run, log)`, then `clock("sample", "[1/7 sample] ...")` at the start
    of each stage (it ends the previous one), `clock.stop()` at the end."""

    FILE = "timings.json"

    def __init__(self, run: Path, log=print):
        import time

        self._now, self._log, self._path = time.perf_counter, log, Path(run) / self.FILE
        self.seconds: dict[str, float] = {}
        self._current, self._t0 = None, self._now()

    def __call__(self, name: str, message: str) -> None:
        self.stop()
        self._current, self._t0 = name, self._now()
        self._log(message)

    def stop(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = round(self._now() - self._t0, 2)
            self._current = None
            write_json({"seconds": self.seconds, "total": round(sum(self.seconds.values()), 2)}, self._path)


def stage_window(start: str | None, stop: str | None, stages: tuple[str, ...] = STAGES) -> tuple[int, int]:
    """Indices in `stages` of the first stage forced to rerun and the last stage to run.

    Raises
    ------
    ValueError
        An unknown stage name.
    """
    for s in (start, stop):
        if s is not None and s not in stages:
            raise ValueError(f"unknown stage '{s}': one of {', '.join(stages)}")
    first = stages.index(start) if start else len(stages)
    last = stages.index(stop) if stop else len(stages) - 1
    return first, last


def stage_plan(start: str | None, stop: str | None, stages: tuple[str, ...] = STAGES):
    """What a pipeline call runs: `force[name]` (rerun that stage even when current: `start`
    and every stage after it) and `todo(name)` (whether the call reaches that stage: up to
    `stop`). Raises ValueError for an unknown stage name (`stage_window`)."""
    first, last = stage_window(start, stop, stages)
    force = {name: i >= first for i, name in enumerate(stages)}
    return force, lambda name: stages.index(name) <= last


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
# Each takes the run directory and what it needs, writes its artifacts atomically there, and
# returns what the next stage needs. MoCAN and PeCAN are short recipes wiring these.

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


def dual_stage(run: Path, scores, safety_cols, beta: float, margins: dict, fraction: float,
               n_boot: int, seed: int, *, force: bool = False, log=print, signed: bool = True,
               max_unsafe_rate: dict | None = None) -> DualRecord:
    """Solve the dual on the scored samples → dual.json and figures/ (skipped when current);
    returns its `DualRecord`, solved or read back.
    `signed=False`: safety scores without a meaningful sign (as `solve_dual_stage`).
    `max_unsafe_rate`: constraint name → largest unsafe rate allowed, instead of a margin
    (the dual then runs on −1{unsafe} for that constraint: λ* applies to that indicator).

    Raises
    ------
    InputError
        Rates with `signed=False`, or as `resolve_margins`.
    InfeasibleMarginError
        As `resolve_margins` and `solve_dual_stage`."""
    from ..data.scores import scores_to_arrays
    from ..dual import unsafe_rate
    from ..errors import InputError
    from ..runio import array_digest
    from .dual_stage import DualRecord, format_dual_summary, solve_dual_stage, write_dual_outputs

    run = Path(run)
    rates = dict(max_unsafe_rate or {})
    if rates and not signed:
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
        d = solve_dual_stage(arrays, beta, resolved, n_boot=n_boot, seed=seed, signed=signed,
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


def train_config(run: Path, beta: float, train: dict):
    """The `PreferenceConfig` of the one-shot training: `train` at β, output in run/train."""
    from ..train.preference import PreferenceConfig

    return PreferenceConfig.from_dict({**train, "beta": beta, "output_dir": str(Path(run) / "train")})


def train_stage(run: Path, model, tokenizer, pairs, beta: float, train: dict, metadata: dict,
                *, force: bool = False):
    """One-shot training on the labeled pairs (resumes from checkpoints in run/train)."""
    from ..train.preference import train_preferences

    tcfg = train_config(run, beta, train)
    # precomputed reference log-probs (PeCAN has them from its implicit scores) save a pass
    cols = ["prompt", "response_0", "response_1", "label"] + [c for c in ("ref_logp_0", "ref_logp_1")
                                                              if c in pairs.columns]
    # changed pairs or settings make an earlier training stale: "auto" starts it over
    return train_preferences(model, tokenizer, pairs[cols], tcfg, resume="auto" if not force else False,
                             metadata=metadata)


def evaluate_stage(run: Path, result, base_spec: str, prompts, jobs, cfg, *, method: str,
                   dual: DualRecord, force: bool = False, log=print, score=None, reward_cols=None,
                   safety_cols=None, unsigned_cols=(), baselines: dict | None = None,
                   baseline_logps: dict | None = None, held_out: HeldOutPrediction | None = None,
                   baseline_kl: bool = False) -> dict:
    """Sample the reference and the trained model on held-out prompts with the same settings,
    score both, compare → eval.json; and judge their behaviour (refusal of harmful prompts,
    over-refusal of benign and borderline ones) with a detector independent of the scores →
    eval.json["behaviour"] (`behaviour_plan`).

    Parameters
    ----------
    jobs : list of ScoreJob
        Scorers run on every model's samples (`score_jobs`).
    score : callable(list of samples paths, force) -> list of DataFrame, optional
        Replaces scoring by `jobs` (PeCAN adds implicit scores from log-probs); it gets
        every model's samples at once, so a model it loads is loaded once.
    reward_cols, safety_cols : list of str, optional
        Columns compared like a reward (no unsafe rate) and like a safety score; default
        `reward` and the jobs' safety columns. The first of each is the one the dual's
        predictions attach to.
    unsigned_cols : list of str
        Safety columns without a meaningful sign (no unsafe rate; PeCAN's implicit ĝ).
    baselines : dict name -> callable() -> (model, tokenizer, model_name), optional
        Other models (PeCAN: DPO_H, DPO_S) sampled and scored on the same prompts with the
        same settings; each is compared with the reference into `eval.json["baselines"][name]`.
    baseline_logps : dict name -> column, optional
        A baseline's own log-probs in its scored table (PeCAN: `logp/helpful` for DPO_H),
        next to `logp/ref`: its KL(π‖π_ref) goes to `eval.json["baselines_kl"][name]`.
    held_out : HeldOutPrediction, optional
        `held_out_prediction_of` the reference's evaluation samples, when the recipe already
        made it before training; else it is made here.
    baseline_kl : bool
        Estimate every baseline's KL(π‖π_ref) on its own samples (`logp/<name>` while it is
        loaded, then `logp/ref`), as `achieved_kl` does for the trained model
        (`dualign compare`); `baseline_logps` then defaults to those columns.
    """
    from ..eval.report import kl_prediction_text
    from ..eval.summary import (compare_scores, format_eval_table, format_kind_gains, format_models_table,
                                 gains_by_prompt_kind)
    from ..runio import write_json
    from ..train.preference import RESULT_FILE

    run = Path(run)
    if score is None:
        score = lambda paths, force: [score_stage(p, jobs, force=force, log=log) for p in paths]  # noqa: E731
    reward_cols = list(reward_cols or ["reward"])
    if safety_cols is None:
        safety_cols = [j.column for j in jobs if j.role == "safety"]
    # the training record changes with every training, sharded weights or not
    trained_name = model_ident(result.model_dir, run, weights=result.output_dir / RESULT_FILE)
    model = result.model
    plan = behaviour_plan(cfg, prompts)  # bad suites fail here, before any sampling
    with _reference_of(model, base_spec) as (ref_model, tok):
        ref_path = reference_eval_samples(run, ref_model, tok, prompts, cfg, base_spec, force=force)
        behaviour_paths = {"reference": _behaviour_samples(run, ref_model, tok, plan, cfg, "reference", base_spec,
                                                           force)}
    trained_path = sample_stage(run, model, result.tokenizer, prompts, cfg, subdir="eval/trained",
                                model_name=trained_name, num_samples=cfg.eval_num_samples, force=force)
    behaviour_paths["trained"] = _behaviour_samples(run, model, result.tokenizer, plan, cfg, "trained",
                                                    trained_name, force)
    paths = {"reference": ref_path, "trained": trained_path}
    for name, load in (baselines or {}).items():
        bmodel, btok, bname = load()
        paths[name] = sample_stage(run, bmodel, btok, prompts, cfg, subdir=f"eval/{name}", model_name=bname,
                                   num_samples=cfg.eval_num_samples, force=force)
        behaviour_paths[name] = _behaviour_samples(run, bmodel, btok, plan, cfg, name, bname, force)
        if baseline_kl:  # its own log-probs now, while it is loaded
            _own_logps([paths[name]], name, bname, lambda m=bmodel, t=btok: (m, t), run, cfg, force, log)
        del bmodel
    if baseline_kl and baselines:
        from contextlib import ExitStack

        from .scoring import REF

        with ExitStack() as stack:  # π_ref is set up only if some column is not current
            _own_logps([paths[n] for n in baselines], REF, base_spec,
                       lambda: stack.enter_context(_reference_of(model, base_spec)), run, cfg, force, log)
        baseline_logps = baseline_logps or {n: f"logp/{n}" for n in baselines}
    tables = dict(zip(paths, score(list(paths.values()), force)))
    ref_scores, trained_scores = tables["reference"], tables["trained"]

    def compare(other, **predictions):
        return compare_scores(ref_scores, other, reward=reward_cols[0], safety=safety_cols,
                              other_rewards=reward_cols[1:], unsigned=unsigned_cols, seed=cfg.seed, **predictions)

    if held_out is None:
        held_out = held_out_prediction_of(ref_scores, dual, reward_cols[0], safety_cols, seed=cfg.seed)
    scores = compare(trained_scores, dual=dual, held_out=held_out)
    record = {"method": method, "beta": dual.beta, "lambda": list(dual.lam),
              "n_eval_prompts": len(prompts), "n_samples_per_prompt": cfg.eval_num_samples,
              "scores": scores, "train": result.summary(),
              "examples": _examples(ref_scores, trained_scores, reward_cols + safety_cols)}
    if baselines:
        record["baselines"] = {name: compare(tables[name]) for name in baselines}
    record["kl"] = achieved_kl(run, result, base_spec, trained_path, trained_name, cfg, dual, force=force, log=log)
    if baseline_logps:
        record["baselines_kl"] = {name: kl_of_own_samples(tables[name], col, "logp/ref", cfg)
                                  for name, col in baseline_logps.items()}
    if plan[1]:
        record["scores_by_prompt_kind"] = gains_by_prompt_kind(ref_scores, trained_scores, plan[1],
                                                               reward_cols + safety_cols, seed=cfg.seed)
    if plan[0]:
        record["behaviour"] = behaviour_section(paths, behaviour_paths, plan, cfg, force=force)
    write_json(record, run / "eval.json")
    log(f"Evaluation on {len(prompts)} held-out prompts × {cfg.eval_num_samples} samples:")
    log(format_eval_table(scores))
    k = record["kl"]
    log(f"  KL(π_θ‖π_ref) achieved {k['achieved']:.3f} [{k['achieved_ci'][0]:.3f}, {k['achieved_ci'][1]:.3f}] nats, "
        f"predicted for π_λ* {kl_prediction_text(dual)}"
        + ("  (achieved indistinguishable from 0: the model barely moved)" if k["achieved_ci"][0] <= 0 else ""))
    if record.get("scores_by_prompt_kind"):
        log("Gain by kind of prompt (a helpfulness reward falls where the model refuses harmful requests):")
        for line in format_kind_gains(record["scores_by_prompt_kind"]):
            log(line)
    if baselines:
        log("Gain over the reference, every model on the same prompts:")
        log(format_models_table(record))
    if "behaviour" in record:
        from ..eval.behaviour import format_behaviour_table

        log(format_behaviour_table(record["behaviour"]))
    return record


def _own_logps(paths, name: str, ident: str, load, run: Path, cfg, force: bool, log) -> None:
    """`logp/<name>` on `paths`, tokenized as the one-shot training tokenizes (`achieved_kl`)."""
    from .scoring import LogProbModel, logprob_columns

    tcfg = train_config(run, cfg.beta, cfg.train)
    logprob_columns(paths, [LogProbModel(name, ident, load)], template=tcfg.template, append_eos=tcfg.append_eos,
                    max_length=tcfg.max_length, batch_size=tcfg.ref_batch_size, force=force, log=log)


def achieved_kl(run: Path, result, base_spec: str, samples_path: Path, trained_name: str, cfg, dual: DualRecord,
                *, force: bool = False, log=print) -> dict:
    """KL(π_θ‖π_ref) of the trained model, estimated on its own evaluation samples.

    The estimate is the mean over prompts of the mean over a prompt's samples y ~ π_θ of
    log π_θ(y|x) − log π_ref(y|x) (nats per response), tokenized as in training; its CI
    resamples prompts. It is unbiased when the samples are drawn with temperature 1 and
    top_p 1; with top_p < 1 (the default 0.9) it measures the KL on the nucleus the samples
    come from. The log-probs are cached as `logp/trained` and `logp/ref` columns of the
    trained samples' scores.parquet (PeCAN's implicit scores already hold `logp/ref`).

    Returns
    -------
    dict: achieved, achieved_ci, predicted and predicted_ci (the dual's KL(π_λ*‖π_ref)),
    predicted_is_lower_bound (the estimate sits at the log K sample ceiling:
    `eval.report.kl_at_sample_ceiling`), note.
    """
    from contextlib import ExitStack

    import pandas as pd

    from ..eval.report import kl_at_sample_ceiling
    from .scoring import REF

    _own_logps([samples_path], "trained", trained_name, lambda: (result.model, result.tokenizer), run, cfg, force,
               log)
    with ExitStack() as stack:  # π_ref is set up only if its column is not current
        _own_logps([samples_path], REF, base_spec, lambda: stack.enter_context(_reference_of(result.model, base_spec)),
                   run, cfg, force, log)
    table = pd.read_parquet(Path(samples_path).parent / "scores.parquet")
    return {**kl_of_own_samples(table, "logp/trained", f"logp/{REF}", cfg),
            "predicted": dual.predicted.kl, "predicted_ci": list(dual.predicted.kl_ci),
            "predicted_is_lower_bound": kl_at_sample_ceiling(dual)}


def kl_of_own_samples(table, policy_col: str, ref_col: str, cfg) -> dict:
    """KL(π‖π_ref) estimated from a table of π's own samples holding both log-probs:
    mean over prompts of the mean of `policy_col − ref_col`, with a bootstrap CI over
    prompts → {achieved, achieved_ci, note}."""
    from ..eval.summary import paired_gain

    as_lp = lambda col: table[["prompt_id", col]].rename(columns={col: "logp"})  # noqa: E731
    kl, ci = paired_gain(as_lp(ref_col), as_lp(policy_col), "logp", seed=cfg.seed)
    return {"achieved": kl, "achieved_ci": ci,
            "note": f"mean log π/π_ref of π's samples (temperature {cfg.temperature:g}, top_p {cfg.top_p:g})"}


class _reference_of:
    """Context manager giving (π_ref, tokenizer): the trained PEFT model with its adapter
    disabled (no second copy of the weights), or a freshly loaded base model."""

    def __init__(self, model, base_spec):
        self.model, self.base_spec, self._ctx = model, base_spec, None

    def __enter__(self):
        if hasattr(self.model, "disable_adapter"):
            self._ctx = self.model.disable_adapter()
            self._ctx.__enter__()
            from ..models.loading import load_tokenizer
            return self.model, load_tokenizer(self.base_spec)
        from ..models.loading import load_policy
        return load_policy(self.base_spec)

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False


def reference_eval_samples(run: Path, ref_model, tokenizer, prompts, cfg, base_spec: str, *,
                           force: bool = False) -> Path:
    """π_ref's samples of the evaluation prompts (run/eval/reference/samples.parquet), with the
    evaluation's settings. Drawn before training for the held-out prediction, and found current
    by the evaluate stage."""
    return sample_stage(run, ref_model, tokenizer, prompts, cfg, subdir="eval/reference", model_name=base_spec,
                        num_samples=cfg.eval_num_samples, force=force)


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


def prompts_of(source: str, column: str = "prompt", split: str | None = None, limit: int | None = None) -> list[str]:
    """Prompts of a file, keeping only rows whose `split` column equals `split` when given
    (the built-in prompts carry train/eval splits); else as `read_prompts`.

    Raises
    ------
    InputError
        As `read_prompts`; also a `split` asked of a file without a `split` column, or one
        that selects nothing.
    """
    from ..errors import InputError
    from ..models.generation import read_prompts
    from ..runio import read_table

    if split is None or not Path(source).exists():
        return read_prompts(source, column, limit=limit) if split is None else \
            read_prompts(source, column, split=split, limit=limit)
    df = read_table(source, required=(column, "split"))
    df = df[df["split"] == split]
    if df.empty:
        raise InputError(f"no prompt has split '{split}'", file=str(source), field="split")
    prompts = df[column].tolist()
    return prompts[:limit] if limit else prompts


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
