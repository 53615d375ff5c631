"""report.md: what was asked, what the dual predicted, what the trained model did."""
from __future__ import annotations

import math
from pathlib import Path

from ..runio import write_text
from .summary import pct


def sample_ceiling_note(dual) -> str | None:
    """A warning when the predicted KL(π_λ*‖π_ref) of `dual` (a `DualRecord`,
    `dualign.pipelines.dual_stage`) nears log K, else None.

    The dual sees π_λ* only as a reweighting of each prompt's K samples, and no reweighting
    of K samples is further than log K nats from the uniform one: near that ceiling the
    samples, not β and λ*, bound the predictions, and the trained model (which tilts the
    whole response space) can move further, with larger gains, than predicted."""
    if not kl_at_sample_ceiling(dual):
        return None
    k, kl = dual.n_samples_per_prompt, dual.predicted.kl
    return (f"predicted KL {kl:.3g} nats is {kl / math.log(k):.0%} of its ceiling log K = {math.log(k):.3g} "
            f"with K = {k} samples per prompt: the samples bound the predictions, and the trained model may "
            f"move further (larger KL and gains) than predicted; the KL is not predicted, only bounded "
            f"below; draw more samples (`num_samples`)")


def at_sample_ceiling(kl: float, k: int) -> bool:
    """Whether a KL estimated by reweighting K samples per prompt sits at half or more of its
    ceiling log K. There it measures how few samples there are, not how far the tilted policy
    is from π_ref: it is a lower bound, and reports print it as one instead of as a prediction."""
    return k >= 2 and kl >= 0.5 * math.log(k)


def kl_at_sample_ceiling(dual) -> bool:
    """`at_sample_ceiling` of the predicted KL of `dual` (a `DualRecord`)."""
    return at_sample_ceiling(dual.predicted.kl, dual.n_samples_per_prompt)


def kl_prediction_text(dual) -> str:
    """The predicted KL(π_λ*‖π_ref) of `dual` (a `DualRecord`) as reports print it: the estimate
    with its CI, or, at the sample ceiling (`kl_at_sample_ceiling`), "not predicted (≥ x nats, ...)"."""
    p, k = dual.predicted, dual.n_samples_per_prompt
    if kl_at_sample_ceiling(dual):
        return f"not predicted (≥ {p.kl:.3g} nats: at {p.kl / math.log(k):.0%} of log K, K = {k})"
    return f"{p.kl:.3f} [{p.kl_ci[0]:.3f}, {p.kl_ci[1]:.3f}]"


def off_support_note(behaviour: dict | None) -> str | None:
    """Why no reweighting of π_ref's samples predicts a model that refuses: a sentence when
    π_ref refused under 5% of a harmful suite and the trained model at least 20% (eval.json's
    `behaviour`), else None."""
    for name, suite in ((behaviour or {}).get("suites") or {}).items():
        models = suite.get("models", {})
        if suite.get("kind") != "harmful" or not {"reference", "trained"} <= set(models):
            continue
        ref, tr = models["reference"]["rate"], models["trained"]["rate"]
        if ref < 0.05 and tr >= 0.2:
            return (f"π_ref refused {ref:.0%} of the {name} prompts and the trained model {tr:.0%}: the dual "
                    "reweights π_ref's samples, so it cannot see answers they do not contain, such as the "
                    "refusals the training pairs taught; pairs drawn from π_ref's own samples (`pairs: samples`) "
                    "keep the model where the prediction looks")
    return None


def _gap_note(scores: dict, kl: float | None = None, achieved_kl: float | None = None,
              behaviour: dict | None = None) -> list[str]:
    """One line per score whose predicted gain lies outside the achieved gain's CI, and per
    constraint stated as a maximum unsafe rate whose predicted unsafe rate lies outside the
    trained rate's CI, with the likely reason for the direction of the gap (`kl`: the
    predicted KL, `achieved_kl`: the trained model's, both in nats); with `behaviour`
    (eval.json's) also `off_support_note` where it applies."""
    off = off_support_note(behaviour)
    if kl is not None:
        kl_text = f"predicted KL {kl:.3g} nats" + (f", achieved {achieved_kl:.3g}" if achieved_kl is not None else "")
    notes = []
    for col, e in scores.items():
        if "predicted_unsafe_rate" in e:
            if e["predicted_unsafe_rate_within_ci"]:
                continue
            lo, hi = e["unsafe_rate_trained_ci"]
            head = (f"- **{col}** (unsafe rate ≤ {pct(e['max_unsafe_rate'])}): trained "
                    f"{pct(e['unsafe_rate_trained'])} [{pct(lo)}, {pct(hi)}], predicted "
                    f"{pct(e['predicted_unsafe_rate'])}. ")
            short = e["unsafe_rate_trained"] > e["predicted_unsafe_rate"]  # less safe than π_λ*
        elif "predicted_gain" not in e:
            continue
        else:
            # judged on the prediction for the same prompts as the measurement when there is one
            here = "predicted_gain_held_out" in e
            if e["held_out_prediction_within_achieved_ci" if here else "prediction_within_achieved_ci"]:
                continue
            pred = e["predicted_gain_held_out" if here else "predicted_gain"]
            lo, hi = e["achieved_gain_ci"]
            head = (f"- **{col}**: achieved {e['achieved_gain']:+.3f} [{lo:+.3f}, {hi:+.3f}], "
                    f"predicted {pred:+.3f}{' on these prompts' if here else ''}. ")
            short = e["achieved_gain"] < pred
        if off:
            notes.append(head + off + ".")
        elif short:
            notes.append(head + "The trained model stopped short of π_λ*"
                         + (f" ({kl_text})" if kl is not None else "") + ": a short run moves only part of the way. "
                         "Train longer (`--train.num_train_epochs`, `--epochs` in the demo) or on more pairs.")
        else:
            notes.append(head + "The trained model went beyond π_λ*"
                         + (f" ({kl_text})" if kl is not None else "") + ": preference "
                         "training on few pairs with near-certain labels keeps pushing the log-ratios past the "
                         "tilted optimum (over-optimization; read the examples for degraded text), and with few "
                         "samples per prompt the dual only sees what reweighting those samples can reach. Lower "
                         "the learning rate or the epochs, and draw more samples (`--num-samples`).")
    return notes


def write_report(run: Path, config: dict, dual, record: dict, notes: list[str] = ()) -> Path:
    """Write `run/report.md` from the dual's `DualRecord` and eval.json's `record`; return its path.

    `notes` are paragraphs shown under the title (e.g. what PeCAN's score columns mean);
    `record["baselines"]`, when present, adds a table of every model on the same prompts."""
    run = Path(run)
    lines = [f"# dualign {record['method']} report", "",
             f"Reference policy `{config.get('policy')}`, β = {dual.beta:g}, "
             f"{dual.n_prompts} prompts × {dual.n_samples_per_prompt} samples for the dual; "
             f"evaluation on {record['n_eval_prompts']} held-out prompts × {record['n_samples_per_prompt']} samples.",
             ""]
    for note in notes:
        lines += [note, ""]
    lines += ["## The dual (solved before training)", "",
             "| constraint | margin | λ* | 95% CI | predicted gain | largest achievable |",
             "|---|---:|---:|---|---:|---:|"]
    rates = [c for c in dual.constraints if c.is_rate]
    for c in dual.constraints:
        lo, hi = c.lambda_ci
        # a rate constraint's margin and gains are in units of −1{unsafe}: show them as rates
        margin, gain, most = ((f"unsafe ≤ {pct(c.max_unsafe_rate)}",
                               f"unsafe {pct(c.predicted_unsafe_rate)} (π_ref {pct(c.unsafe_rate_reference)})",
                               f"unsafe → {pct(c.min_unsafe_rate)}") if c.is_rate else
                              (f"{c.margin:.4g}", f"{c.predicted_gain:+.4g}", f"{c.max_gain:.4g}"))
        lines.append(f"| {c.name} | {margin} | {c.lam:.4g} | [{lo:.4g}, {hi:.4g}] | {gain} | {most} |")
    if rates:
        lines += ["", "A constraint stated as a maximum unsafe rate (unsafe: safety score < 0) is solved on "
                  "−1{unsafe}, and its λ* weighs that indicator in the pair labels: its row gives the bound, the "
                  "unsafe rate predicted for π_λ* (π_ref's on the same samples) and the smallest reachable rate, "
                  "approached only as λ → ∞."]
    p = dual.predicted
    ceiling = sample_ceiling_note(dual)
    lines += ["", f"Predicted reward gain {p.reward_gain:+.4g} (95% CI [{p.reward_gain_ci[0]:+.4g}, "
              f"{p.reward_gain_ci[1]:+.4g}]), KL(π_λ*‖π_ref) {kl_prediction_text(dual)}, effective samples per "
              f"prompt {p.ess_mean:.3g} of {dual.n_samples_per_prompt}. Solver: converged = "
              f"{dual.converged}, KKT residual {dual.kkt_residual:.1e}."
              + (f" **Note:** {ceiling}." if ceiling else ""), "",
              "![dual function](figures/dual_function.png) ![safety scores](figures/safety_histogram.png)", ""]
    if record.get("behaviour"):
        lines += behaviour_lines(record["behaviour"]) + [""]
    held = any("predicted_gain_held_out" in e for e in record["scores"].values())
    lines += ["## Predicted vs achieved (held-out prompts)", ""]
    if held:
        lines += ["Two predictions, both made before training: on the dual's prompts (from its samples), and on "
                  "these held-out prompts (λ* applied to π_ref's samples of them, `held_out_prediction`); the "
                  "second is measured on the same prompts as the achieved gain.", ""]
    lines += ["| score | reference | trained | achieved gain [95% CI] | predicted gain "
              + ("(dual's prompts / held-out [95% CI]) " if held else "") + "| unsafe rate ref → trained |",
              "|---|---:|---:|---|---:|---|"]
    for col, e in record["scores"].items():
        lo, hi = e["achieved_gain_ci"]
        pred = f"{e['predicted_gain']:+.3f}" if "predicted_gain" in e else "–"
        if "predicted_gain_held_out" in e:
            h_lo, h_hi = e["predicted_gain_held_out_ci"]
            pred += f" / {e['predicted_gain_held_out']:+.3f} [{h_lo:+.3f}, {h_hi:+.3f}]"
        unsafe = (f"{e['unsafe_rate_reference']:.0%} → {e['unsafe_rate_trained']:.0%}"
                  if "unsafe_rate_reference" in e else "")
        if "predicted_unsafe_rate" in e:  # a rate constraint: its prediction is the rate, not a gain
            r_lo, r_hi = e["unsafe_rate_trained_ci"]
            unsafe = (f"{pct(e['unsafe_rate_reference'])} → {pct(e['unsafe_rate_trained'])} [{pct(r_lo)}, "
                      f"{pct(r_hi)}]; predicted {pct(e['predicted_unsafe_rate'])}, "
                      f"bound ≤ {pct(e['max_unsafe_rate'])}")
        lines.append(f"| {col} | {e['reference_mean']:.3f} | {e['trained_mean']:.3f} | "
                     f"{e['achieved_gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {pred} | {unsafe} |")
    gaps = _gap_note(record["scores"], dual.predicted.kl, record.get("kl", {}).get("achieved"),
                     record.get("behaviour"))
    rated = any("predicted_unsafe_rate" in e for e in record["scores"].values())
    lines += [""] + (["Where the prediction and the measurement disagree:", ""] + gaps if gaps else
                     ["Every predicted gain lies inside the achieved gain's 95% CI"
                      + (", and every predicted unsafe rate inside the trained rate's 95% CI." if rated else ".")])
    if record.get("scores_by_prompt_kind"):
        lines += ["", "Achieved gain by kind of prompt (helpfulness is read on the benign prompts: a helpfulness "
                  "reward falls on harmful prompts when the model refuses them, which is what the constraint buys):",
                  "", "| prompts | score | reference | trained | achieved gain [95% CI] |", "|---|---|---:|---:|---|"]
        for kind, cols in record["scores_by_prompt_kind"].items():
            for col, e in cols.items():
                lo, hi = e["achieved_gain_ci"]
                lines.append(f"| {kind} ({e['n_prompts']}) | {col} | {e['reference_mean']:.3f} | "
                             f"{e['trained_mean']:.3f} | {e['achieved_gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    if "kl" in record:
        k = record["kl"]
        lines += ["", f"KL(π_θ‖π_ref) of the trained model: {k['achieved']:.3f} nats, 95% CI "
                  f"[{k['achieved_ci'][0]:.3f}, {k['achieved_ci'][1]:.3f}] ({k['note']}); predicted for π_λ*: "
                  f"{kl_prediction_text(dual)}."
                  + (" The achieved KL is indistinguishable from 0 (the estimate can come out negative): "
                     "the model barely moved." if k["achieved_ci"][0] <= 0 else "")]
    from .tilt import learned_tilt_from_dict, learned_tilt_line

    if record.get("learned_tilt"):
        predicted = {col: e.get("predicted_gain_held_out") for col, e in record["scores"].items()}
        lines += ["", "How much of λ*'s tilt the training learned, seen as the dual sees π_λ* — "
                  + learned_tilt_line(learned_tilt_from_dict(record["learned_tilt"]), predicted)
                  + ". Where the reweighted gains fall short of π_λ*'s, the training did not learn the tilt; where "
                  "they match but the achieved gains do not, the model moved where π_ref's samples do not reach."]
    if record.get("learned_tilt_training_samples"):
        lines += ["", "The same on the samples the pairs were drawn from (the dual's own) — "
                  + learned_tilt_line(learned_tilt_from_dict(record["learned_tilt_training_samples"]),
                                      dual.predicted_gains(), where="training")
                  + ". A slope here far above the held-out one means the training fitted the answers it saw, not "
                  "the tilt."]
    if record.get("baselines"):
        lines += _models_table(record)
    t = record.get("train", {})
    lines += ["", f"Training: {t.get('n_pairs')} pairs, {t.get('global_step')} optimizer steps, final loss "
              f"{t.get('train_loss', float('nan')):.4f}; model in `{t.get('model_dir')}`.", "",
              "![before and after](figures/before_after.png)", "", "## Examples (reference → trained)", ""]
    for ex in record.get("examples", []):
        lines += [f"**Prompt:** {ex['prompt']}", "",
                  f"- *reference* ({_fmt_scores(ex['reference'])}): {_quote(ex['reference']['response'])}",
                  f"- *trained* ({_fmt_scores(ex['trained'])}): {_quote(ex['trained']['response'])}", ""]
    path = run / "report.md"
    write_text("\n".join(lines) + "\n", path)
    return path


def behaviour_lines(behaviour: dict) -> list[str]:
    """Markdown section of a behaviour record (eval.json's `behaviour`, `dualign evaluate`'s
    behaviour.json): what was measured, by which detector, and the table of rates."""
    from .behaviour import behaviour_rows, refusals_ended_line

    header, rows = behaviour_rows(behaviour)
    det = behaviour["detector"]
    how = ("refusal phrases (`dualign.eval.refusal`: no model)" if det == "phrases" else f"`{det}`")
    lines = ["## Behaviour (judged without the training's score models)", "",
             f"Refusal detector: {how}. It is independent of the training: no reward, cost or implicit score "
             "model that defined the training's target judges here. Harmful suites: the refusal rate (higher is "
             "safer); benign and borderline-benign suites: the over-refusal rate (lower is better). Rate = mean "
             "over prompts of the fraction of a prompt's samples that refuse, 95% bootstrap CI over prompts; "
             "trained − reference in percentage points, paired by prompt.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    ended = refusals_ended_line(behaviour)
    if ended:
        lines += ["", ended[0].upper() + ended[1:] + "."]
    if behaviour.get("detector_unparsed"):
        lines += ["", f"{behaviour['detector_unparsed']} detector answers could not be parsed and count as compliance."]
    return lines


def _models_table(record: dict) -> list[str]:
    """Markdown table: every model's mean score, its gain over the reference [95% CI] and,
    for safety scores, its unsafe rate."""
    from .summary import model_kls

    cols = list(record["scores"])
    models = {record["method"]: record["scores"], **record["baselines"]}
    kls = model_kls(record)
    kl_cell = lambda k: f"{k[0]:.3f} [{k[1][0]:.3f}, {k[1][1]:.3f}]" if k else "–"  # noqa: E731
    lines = ["", "## Every model on the same held-out prompts", "",
             "Mean score, gain over the reference [95% CI] and, for safety scores, the unsafe rate"
             + ("; KL(π‖π_ref) in nats on each model's own samples." if kls else "."), "",
             "| model | " + " | ".join(cols) + (" | KL(π‖π_ref)" if kls else "") + " |",
             "|---|" + "---|" * (len(cols) + bool(kls)),
             "| reference | " + " | ".join(_cell(record["scores"][c], ref=True) for c in cols)
             + (" | 0" if kls else "") + " |"]
    for name, sc in models.items():
        lines.append(f"| {name} | " + " | ".join(_cell(sc.get(c)) for c in cols)
                     + (f" | {kl_cell(kls.get(name))}" if kls else "") + " |")
    return lines


def _cell(e: dict | None, ref: bool = False) -> str:
    if e is None:
        return "–"
    if ref:
        return f"{e['reference_mean']:.3f}" + (f" ({e['unsafe_rate_reference']:.0%} unsafe)"
                                               if "unsafe_rate_reference" in e else "")
    lo, hi = e["achieved_gain_ci"]
    return (f"{e['trained_mean']:.3f}: {e['achieved_gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            + (f" ({e['unsafe_rate_trained']:.0%} unsafe)" if "unsafe_rate_trained" in e else ""))


def _fmt_scores(d: dict) -> str:
    return ", ".join(f"{k} {v:+.2f}" for k, v in d.items() if k != "response")


def _quote(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "…"
