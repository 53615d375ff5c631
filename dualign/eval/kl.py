"""KL(π‖π_ref) of a policy, estimated on its own samples: the evaluation's "achieved" KL of the
trained model, and of every baseline, next to the dual's prediction for π_λ*."""
from __future__ import annotations

from pathlib import Path


def kl_of_own_samples(table, policy_col: str, ref_col: str, cfg) -> dict:
    """KL(π‖π_ref) estimated from a table of π's own samples holding both log-probs:
    mean over prompts of the mean of `policy_col − ref_col`, with a bootstrap CI over
    prompts (`cfg.seed`) → {achieved, achieved_ci, note}."""
    from .summary import paired_gain

    as_lp = lambda col: table[["prompt_id", col]].rename(columns={col: "logp"})  # noqa: E731
    kl, ci = paired_gain(as_lp(ref_col), as_lp(policy_col), "logp", seed=cfg.seed)
    return {"achieved": kl, "achieved_ci": ci,
            "note": f"mean log π/π_ref of π's samples (temperature {cfg.temperature:g}, top_p {cfg.top_p:g})"}


def achieved_kl(samples_path: Path, trained, reference, tokenization: dict, cfg, dual, *, force: bool = False,
                log=print) -> dict:
    """KL(π_θ‖π_ref) of the trained model, estimated on its own evaluation samples.

    The estimate is the mean over prompts of the mean over a prompt's samples y ~ π_θ of
    log π_θ(y|x) − log π_ref(y|x) (nats per response), tokenized as in training; its CI
    resamples prompts. It is unbiased when the samples are drawn with temperature 1 and
    top_p 1; with top_p < 1 (the default 0.9) it measures the KL on the nucleus the samples
    come from. The log-probs are cached as columns of the trained samples' scores.parquet
    (PeCAN's implicit scores already hold `logp/ref`).

    Parameters
    ----------
    samples_path : Path
        The trained model's evaluation samples.
    trained, reference : pipelines.scoring.LogProbModel
        π_θ (column `logp/<trained.name>`) and π_ref (`logp/<reference.name>`); each is
        loaded only when its column is not current.
    tokenization : dict
        `template`, `append_eos`, `max_length`, `batch_size` of `logprob_columns`: the
        training's (`stages.tokenization_of`).
    cfg : pipeline config (`seed`, `temperature`, `top_p`)
    dual : DualRecord
        Its predicted KL(π_λ*‖π_ref) goes next to the estimate.

    Returns
    -------
    dict: achieved, achieved_ci, note, predicted and predicted_ci (the dual's KL(π_λ*‖π_ref)),
    predicted_is_lower_bound (the estimate sits at the log K sample ceiling:
    `eval.report.kl_at_sample_ceiling`).
    """
    import pandas as pd

    from ..pipelines.scoring import logprob_columns
    from .report import kl_at_sample_ceiling

    logprob_columns([samples_path], [trained, reference], force=force, log=log, **tokenization)
    table = pd.read_parquet(Path(samples_path).parent / "scores.parquet")
    return {**kl_of_own_samples(table, f"logp/{trained.name}", f"logp/{reference.name}", cfg),
            "predicted": dual.predicted.kl, "predicted_ci": list(dual.predicted.kl_ci),
            "predicted_is_lower_bound": kl_at_sample_ceiling(dual)}
