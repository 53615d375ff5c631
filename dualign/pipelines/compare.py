"""`dualign compare`: MoCAN and its rivals on the same data, judged the same way, with the
compute each one cost.

    per seed, <out>/seed-<s>/:
      mocan/            a MoCAN run: sample π_ref → score → dual (λ*, the margin)
      <method>/         each rival trained from the preference data (DPO_H, DPO_S, SafeDPO,
                        SACPO, P-SACPO) or online against the same scorers (primal–dual)
      mocan/            → pairs → train → evaluate: π_ref, MoCAN and every rival sampled on
                        the same held-out prompts with the same seeds; scores, KL, behaviour
    at the end, in <out>/: compare.json, compare.md (one table), figures/compare.png

Every stage is cached like a MoCAN run's; a killed comparison, rerun, goes on where it stopped.

One module, though over 500 lines: the comparison's settings, the loop over seeds and methods,
the compute accounting and the one table and figure are one recipe read top to bottom; how
each rival trains lives elsewhere (`pipelines/baselines.py`, `train/`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from ..runio import read_jsonl, write_json, write_text
from .config import OUT_HELP, MoCANConfig, validated
from .scoring import safety_columns

if TYPE_CHECKING:
    from .dual_stage import DualRecord

METHODS = ("mocan", "dpo_h", "dpo_s", "safedpo", "sacpo", "p_sacpo", "primal_dual")
LABELS = {"mocan": "MoCAN", "dpo_h": "DPO_H", "dpo_s": "DPO_S", "safedpo": "SafeDPO", "sacpo": "SACPO",
          "p_sacpo": "P-SACPO", "primal_dual": "primal–dual", "reference": "π_ref"}


@dataclass
class CompareConfig(MoCANConfig):
    """A MoCAN config (`MoCANConfig`'s fields: the reference, scorers, prompts, margins, β,
    training) plus the rivals to train next to it.

    Each field's help is in its metadata (`--help` of the commands shows it).
    """

    NESTED = ("train", "baseline_train", "primal_dual")

    out: str = field(default="runs/compare", metadata={"help": OUT_HELP})
    methods: list = field(default_factory=lambda: list(METHODS), metadata={"help": (
        "which methods to run, among mocan, dpo_h, dpo_s, safedpo, sacpo, p_sacpo, primal_dual (mocan "
        "is always run: its dual sets the margin the others are held to).")})
    seeds: list = field(default_factory=lambda: [0], metadata={"help": (
        "one full comparison per seed (sampling, training and evaluation seeds).")})
    preferences: str = field(default="", metadata={"help": (
        "preference file with helpfulness and safety labels (PKU-SafeRLHF schema) for DPO_H, DPO_S, "
        "SafeDPO and SACPO; default: `pairs` when it is a file.")})
    safedpo_delta: float = field(default=2.0, metadata={"help": (
        "SafeDPO's offset Δ (logit units) on pairs whose preferred answer is safe and the other "
        "unsafe.")})
    sacpo_lambda: float = field(default=1.0, metadata={"help": (
        "SACPO's λ: its safety stage uses KL coefficient β/λ.")})
    p_sacpo_weight: float = field(default=0.5, metadata={"help": (
        "P-SACPO's interpolation weight q: θ_h + q·(θ_hs − θ_h).")})
    baseline_train: dict = field(default_factory=dict, metadata={"help": (
        "training settings of the DPO-family rivals, on top of `train`.")})
    primal_dual: dict = field(default_factory=dict, metadata={"help": (
        "settings of the primal–dual baseline (`PrimalDualConfig` fields).")})

    def validate(self) -> "CompareConfig":
        super().validate()
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InputError(f"unknown method(s) {', '.join(map(str, unknown))}; choose from {', '.join(METHODS)}",
                             field="methods")
        if "mocan" not in self.methods:
            self.methods = ["mocan", *self.methods]
        if isinstance(self.seeds, (int, str)):
            self.seeds = [s for s in str(self.seeds).split(",") if s.strip()]
        try:
            self.seeds = [int(s) for s in self.seeds]
        except (TypeError, ValueError):
            raise InputError(f"must be a list of integers, got {self.seeds!r}", field="seeds") from None
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise InputError("give one or more distinct seeds", field="seeds")
        if not (np.isfinite(self.safedpo_delta) and self.safedpo_delta >= 0):
            raise InputError(f"must be a finite number >= 0; got {self.safedpo_delta}", field="safedpo_delta")
        if not (np.isfinite(self.sacpo_lambda) and self.sacpo_lambda > 0):
            raise InputError(f"must be a finite number > 0; got {self.sacpo_lambda}", field="sacpo_lambda")
        if not 0 <= self.p_sacpo_weight <= 1:
            raise InputError(f"must be in [0, 1]; got {self.p_sacpo_weight}", field="p_sacpo_weight")
        if self.uses_preferences():
            if not self.preference_file():
                raise InputError("DPO_H, DPO_S, SafeDPO and SACPO train on a preference file with helpfulness "
                                 "and safety labels: set `preferences`", field="preferences")
            if not Path(self.preference_file()).is_file():
                raise InputError("no such file", file=self.preference_file(), field="preferences")
        self._validate_training("baseline_train")
        if "primal_dual" in self.methods:
            self.primal_dual_config(Path(self.out))  # a bad setting fails now, not after hours
        return self

    def uses_preferences(self) -> bool:
        return any(m in self.methods for m in ("dpo_h", "dpo_s", "safedpo", "sacpo", "p_sacpo"))

    def preference_file(self) -> str:
        return self.preferences or (self.pairs if self.pairs != "samples" else "")

    def mocan_config(self, seed: int, out: Path) -> MoCANConfig:
        """The MoCAN run of one seed: every shared field, the seed in sampling and training."""
        names = {f.name for f in dataclasses.fields(MoCANConfig)}
        own = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        return MoCANConfig(**{**own, "out": str(out), "seed": int(seed), "train": {**self.train, "seed": int(seed)}})

    def baseline_config(self, out: Path, seed: int, beta: float | None = None):
        """`PreferenceConfig` of a DPO-family rival: `train` + `baseline_train`, at β (or the given
        β, SACPO's β/λ), output in `out`."""
        from ..train.preference import PreferenceConfig

        return PreferenceConfig.from_dict({**self.train, **self.baseline_train, "seed": int(seed),
                                           "beta": self.beta if beta is None else beta, "output_dir": str(out)},
                                          section="baseline_train")

    def primal_dual_config(self, out: Path, seed: int | None = None, safety_target: float = 0.0):
        """`PrimalDualConfig` of the primal–dual rival: the training settings it shares with
        `train` (learning rate, batch size, LoRA, ...), MoCAN's β and generation settings, the
        target E_ref[g] + margin, then `primal_dual` on top."""
        from ..train.primal_dual import PrimalDualConfig

        shared = {f.name for f in dataclasses.fields(PrimalDualConfig)}
        base = {k: v for k, v in self.train.items() if k in shared}
        settings = {**base, "beta": self.beta, "max_new_tokens": self.max_new_tokens,
                    "temperature": self.temperature, "top_p": self.top_p, "safety_target": safety_target,
                    **({"seed": int(seed)} if seed is not None else {}), **self.primal_dual}
        return PrimalDualConfig.from_dict(settings)


# ----------------------------------------------------------------------------- the rivals

def train_rival(method: str, cfg: CompareConfig, seed_dir: Path, seed: int, prefs, *, dual: DualRecord,
                prompts: list[str], jobs, log=print) -> dict:
    """Train (or find trained) one rival → {"model_dir", "base", "wall_s", "trained_tokens",
    "generated_tokens", "scored_responses", ...}. `base` is the model an adapter sits on."""
    from ..models.loading import load_policy
    from ..train.preference import MODEL_DIRNAME, train_preferences
    from .baselines import safedpo_pairs, scale_adapter
    from .pecan import dpo_pairs

    out = seed_dir / method
    t0 = time.perf_counter()
    info: dict = {"base": cfg.policy}
    if method in ("dpo_h", "dpo_s", "safedpo"):
        pairs = {"dpo_h": lambda: dpo_pairs(prefs, "better"), "dpo_s": lambda: dpo_pairs(prefs, "safer"),
                 "safedpo": lambda: safedpo_pairs(prefs, cfg.safedpo_delta)}[method]()
        tcfg = cfg.baseline_config(out, seed)
        model, tok = load_policy(cfg.policy)
        log(f"  {LABELS[method]}: {len(pairs)} pairs, {tcfg.num_train_epochs:g} epoch(s)")
        meta = {"method": method, "base_model": cfg.policy, "beta": cfg.beta, "data": cfg.preference_file(),
                **({"safedpo_delta": cfg.safedpo_delta} if method == "safedpo" else {})}
        cols = [c for c in ("prompt", "response_0", "response_1", "label", "offset") if c in pairs.columns]
        train_preferences(model, tok, pairs[cols], tcfg, resume="auto", metadata=meta)
        info.update(model_dir=str(out / MODEL_DIRNAME), trained_tokens=trained_tokens(tok, pairs, tcfg))
    elif method in ("sacpo", "p_sacpo"):
        info.update(_train_sacpo(cfg, seed_dir, prefs, seed, log))
        if method == "p_sacpo":
            src = Path(info["model_dir"])
            dst = out / MODEL_DIRNAME
            scale_adapter(src, dst, cfg.p_sacpo_weight)
            info["model_dir"] = str(dst)
    elif method == "primal_dual":
        info.update(_train_primal_dual(cfg, out, seed, dual, prompts, jobs, log))
    else:
        raise ValueError(f"not a rival: {method!r}")
    info["wall_s"] = time.perf_counter() - t0
    return info


def _train_sacpo(cfg: CompareConfig, seed_dir: Path, prefs, seed: int, log) -> dict:
    """SACPO: DPO on helpfulness from π_ref (stage 1, β), merged into full weights; then DPO on
    the safety labels from that model, which is also its reference (stage 2, β/λ)."""
    from ..models.loading import load_policy
    from ..train.preference import MODEL_DIRNAME, load_trained, train_preferences
    from .baselines import save_merged
    from .pecan import dpo_pairs

    out = seed_dir / "sacpo"
    h_pairs, s_pairs = dpo_pairs(prefs, "better"), dpo_pairs(prefs, "safer")
    cfg1 = cfg.baseline_config(out / "stage1_helpful", seed)
    model, tok = load_policy(cfg.policy)
    log(f"  SACPO stage 1: helpfulness DPO on {len(h_pairs)} pairs (β = {cfg.beta:g})")
    r1 = train_preferences(model, tok, h_pairs, cfg1, resume="auto",
                           metadata={"method": "sacpo_stage1", "base_model": cfg.policy, "beta": cfg.beta})
    merged_dir = out / "stage1_merged"
    # merged again only when stage 1 was trained again (its training record changes each time)
    stamp = merged_dir / "source.json"
    source = {"adapter": str(r1.model_dir), "key": _model_key(r1.model_dir)}
    if not (stamp.exists() and json.loads(stamp.read_text()) == source):
        # merging writes into the frozen weights r1.model shares with `model` (π_ref, not used after)
        save_merged(r1.model, tok, merged_dir)
        write_json(source, stamp)
    beta2 = cfg.beta / cfg.sacpo_lambda
    base2, _ = load_trained(merged_dir)
    cfg2 = cfg.baseline_config(out / "stage2_safety", seed, beta=beta2)
    log(f"  SACPO stage 2: safety DPO on {len(s_pairs)} pairs from the stage-1 model (β/λ = {beta2:g})")
    train_preferences(base2, tok, s_pairs, cfg2, resume="auto",
                      metadata={"method": "sacpo", "base_model": str(merged_dir), "beta": beta2,
                                "sacpo_lambda": cfg.sacpo_lambda})
    return {"model_dir": str(out / "stage2_safety" / MODEL_DIRNAME), "base": str(merged_dir),
            "trained_tokens": trained_tokens(tok, h_pairs, cfg1) + trained_tokens(tok, s_pairs, cfg2)}


def _train_primal_dual(cfg: CompareConfig, out: Path, seed: int, dual: DualRecord, prompts, jobs, log) -> dict:
    """The Safe-RLHF-style baseline held to MoCAN's constraint: E_π[g] ≥ E_ref[g] + margin, with
    E_ref[g] the mean safety of π_ref's own samples (the dual's scores)."""
    from ..models.loading import load_policy
    from ..models.scorers import load_scorer
    from ..train.primal_dual import train_primal_dual

    if len(dual.constraints) != 1 or dual.constraints[0].is_rate:
        raise InputError("the primal–dual baseline is built for one margin constraint", field="safety")
    # DualRecord.read has refused a dual.json without the reference's mean safety
    c = dual.constraints[0]
    target = float(c.reference_mean + c.margin)
    pcfg = cfg.primal_dual_config(out, seed, safety_target=target)
    model, tok = load_policy(cfg.policy)
    specs = {col: spec for col, spec, _ in jobs}
    reward = load_scorer(specs["reward"])
    safety = {j.column: load_scorer(j.spec) for j in jobs if j.role == "safety"}
    log(f"  primal–dual: GRPO on r + λ·g, λ by projected dual ascent, target E[g] ≥ {target:.3f}")
    res = train_primal_dual(model, tok, prompts, reward, safety, pcfg, out, resume=True,
                            metadata={"method": "primal_dual", "base_model": cfg.policy, "margins": list(dual.margins)})
    episodes = sum(int(r.get("episodes", 0)) for r in read_jsonl(res.log_path))
    return {"model_dir": str(res.model_dir), "generated_tokens": int(res.generated_tokens),
            "trained_tokens": int(res.trained_tokens), "scored_responses": episodes * len(jobs),
            "final_lambda": {k: float(v) for k, v in res.final_lambda.items()}, "steps": int(res.global_step)}


def trained_tokens(tokenizer, pairs, tcfg) -> int:
    """Tokens run through training: both sequences of every pair, as tokenized for training,
    times the epochs."""
    from ..train.preference import tokenize_pairs

    feats = tokenize_pairs(tokenizer, pairs, tcfg)
    per_epoch = sum(len(f["prompt_ids_0"]) + len(f["response_ids_0"]) + len(f["prompt_ids_1"])
                    + len(f["response_ids_1"]) for f in feats)
    return int(round(per_epoch * float(tcfg.num_train_epochs)))


def rival_loader(info: dict, base_spec: str, ident: str):
    """eval loader → (model, tokenizer, model name) of a trained rival; the tokenizer is always
    the reference's, so every model tokenizes the evaluation alike."""
    def load():
        from ..models.loading import load_tokenizer
        from ..train.preference import load_trained

        # an adapter sits on π_ref, or (SACPO, P-SACPO) on the merged first stage
        model = load_trained(info["model_dir"], base_model=info["base"])[0]
        return model, load_tokenizer(base_spec), ident
    return load


# ----------------------------------------------------------------------------- the comparison

def run_compare(cfg: CompareConfig, log=print) -> Path:
    """Run every method of `cfg` for every seed and write compare.json, compare.md and the
    figure. Returns the comparison folder."""
    from ..runio import run_lock

    validated(cfg)
    with run_lock(cfg.out):  # a second comparison into the same folder is refused, not mixed in
        return _run_compare(cfg, log)


def _run_compare(cfg: CompareConfig, log) -> Path:
    from ..data.preferences import load_preferences
    from ..models.loading import load_policy
    from ..data.prompts import config_prompts
    from . import stages as S
    from .dual_stage import DualRecord
    from .mocan import run_mocan
    from .scoring import score_jobs

    root = Path(cfg.out)
    write_json(dataclasses.asdict(cfg), root / "config.json")
    prefs = load_preferences(cfg.preference_file(), require_safety=True, limit=cfg.max_pairs or None) \
        if cfg.uses_preferences() else None
    jobs = score_jobs(cfg.reward, cfg.safety)
    per_seed = {}
    n_params = None
    for seed in cfg.seeds:
        seed_dir = root / f"seed-{seed}"
        mcfg = cfg.mocan_config(seed, seed_dir / "mocan")
        log(f"== seed {seed}: MoCAN up to its dual")
        run_mocan(mcfg, stop="dual", log=log)
        before = _stage_seconds(seed_dir / "mocan", ("sample", "score", "dual"))
        dual = DualRecord.read(seed_dir / "mocan" / "dual.json")
        prompts = config_prompts(cfg)
        rivals = {}
        for m in cfg.methods:
            if m == "mocan":
                continue
            log(f"== seed {seed}: {LABELS[m]}")
            info = train_rival(m, cfg, seed_dir, seed, prefs, dual=dual, prompts=prompts, jobs=jobs, log=log)
            info["wall_s"] = measured_seconds(seed_dir / m / "compare_info.json",
                                              _model_key(Path(info["model_dir"])), info["wall_s"], info)
            rivals[m] = info
        loaders = {m: rival_loader(info, cfg.policy, S.model_ident(info["model_dir"], seed_dir / "mocan"))
                   for m, info in rivals.items()}
        log(f"== seed {seed}: MoCAN pairs → train → evaluate every model on the same held-out prompts")
        run_mocan(mcfg, log=log, baselines=loaders)
        own = before + _stage_seconds(seed_dir / "mocan", ("pairs", "train"))
        measured_seconds(seed_dir / "mocan" / "compare_info.json", _model_key(seed_dir / "mocan" / "train" / "model"),
                         own)
        if n_params is None:
            n_params = sum(p.numel() for p in load_policy(cfg.policy)[0].parameters())
        per_seed[seed] = seed_summary(seed_dir, cfg, rivals, n_params, jobs)
    record = aggregate(per_seed, cfg)
    write_json(record, root / "compare.json")
    table = format_compare_table(record)
    write_text(table + "\n", root / "compare.md")
    log(table)
    from ..data.scores import read_score_arrays

    safety_cols = safety_columns(jobs)
    arrays = read_score_arrays(root / f"seed-{cfg.seeds[0]}" / "mocan" / "scores.parquet", "reward", safety_cols)
    plot_compare(record, arrays, cfg.beta, root / "figures" / "compare.png")
    return root


def plot_compare(record: dict, arrays, beta: float, path) -> Path:
    """The reward–safety plane: one point per method (first seed's 95% CI bars, or ± sd over
    seeds), π_ref at the origin, and the dual's predicted frontier π_λ (λ from 0 to 1000, on the
    dual's own prompts) for the first safety score."""
    from ..dual import DualProblem
    from ..eval.figures import _pyplot, _save

    problem = DualProblem(arrays.reward, arrays.safety, beta, 0.0)
    lams = np.concatenate([[0.0], np.logspace(-3, 3, 80)])
    preds = [problem.predict(np.full(problem.m, lam)) for lam in lams]
    col = arrays.safety_names[0]
    one = len(record["seeds"]) == 1
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([p.safety_gain[0] for p in preds], [p.reward_gain for p in preds], "-", color="0.6", lw=1.2,
            label="predicted frontier (π_λ, dual's prompts)")
    for m, s in record["summary"].items():
        x, y = s[f"{col}_gain"]["mean"], s["reward_gain"]["mean"]
        if one:
            xe = [[x - s[f"{col}_gain_ci"][0]], [s[f"{col}_gain_ci"][1] - x]]
            ye = [[y - s["reward_gain_ci"][0]], [s["reward_gain_ci"][1] - y]]
        else:
            xe, ye = s[f"{col}_gain"]["sd"], s["reward_gain"]["sd"]
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", capsize=3, label=LABELS.get(m, m))
    ax.plot(0, 0, "s", color="k", label="π_ref")
    for name, margin in record["margins"].items():
        if name == col and margin is not None:
            ax.axvline(margin, color="0.3", ls=":", lw=1, label=f"margin {margin:.3g}")
    ax.set_xlabel(f"{col} gain over π_ref (held-out prompts)")
    ax.set_ylabel("reward gain over π_ref (held-out prompts)")
    ax.set_title("Every method on the same held-out prompts " + ("(95% CI)" if one else "(± sd over seeds)"),
                 fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _stage_seconds(run: Path, stages) -> float:
    t = json.loads((run / "timings.json").read_text())["seconds"] if (run / "timings.json").exists() else {}
    return float(sum(t.get(s, 0.0) for s in stages))


def _model_key(model_dir: Path) -> str:
    """Identity of a trained model: its training record changes with every training."""
    from ..runio import file_digest

    return file_digest(model_dir / "dualign_train.json")


def measured_seconds(path: Path, key: str, seconds: float, extra: dict | None = None) -> float:
    """The wall time a model cost to make: `seconds` when it was just made, else the time
    recorded in `path` with the same `key` (a rerun that found the model trained measured only
    the check). Writes `path` with the key, the seconds and `extra`."""
    old = json.loads(path.read_text()) if path.exists() else {}
    if old.get("key") == key:
        seconds = float(old["wall_s"])
    write_json({**(extra or {}), "key": key, "wall_s": float(seconds)}, path)
    return float(seconds)


def _behaviour_rate(behaviour: dict | None, kind: str, model: str):
    if not behaviour:
        return None
    rates = [s["models"][model]["rate"] for s in behaviour["suites"].values()
             if s["kind"] == kind and model in s["models"]]
    return float(np.mean(rates)) if rates else None


def seed_summary(seed_dir: Path, cfg: CompareConfig, rivals: dict, n_params: int, jobs) -> dict:
    """One seed's row per model: gains with CIs, unsafe rate, refusal / over-refusal, KL, whether
    the constraint holds, and compute (wall time, tokens, estimated FLOPs)."""
    import pandas as pd

    from .dual_stage import DualRecord

    run = seed_dir / "mocan"
    ev = json.loads((run / "eval.json").read_text())
    dual = DualRecord.read(run / "dual.json")
    safety_cols = safety_columns(jobs)
    n_scorers = len(jobs)
    samples = pd.read_parquet(run / "samples.parquet", columns=["n_tokens"])
    gen = int(samples["n_tokens"].sum())
    margins = {c.name: c.margin for c in dual.constraints}
    # The margin is a gain on the dual's prompts; the methods are measured on the held-out ones,
    # whose reference may be safer (on the demo, making every held-out answer harmless gains +0.36,
    # the margin is 0.588: no method could meet it there). Each is held to what π_λ* is predicted
    # to gain on the prompts it is measured on: λ* on π_ref's samples of them (the margin where
    # there is no such prediction). The plug-in value, not the jackknifed one: with the 2 samples
    # per prompt of a default evaluation the correction doubles it, past what is reachable.
    targets = {c: ev["scores"].get(c, {}).get("predicted_gain_held_out") for c in margins}
    targets = {c: (margins[c] if t is None else float(t)) for c, t in targets.items()}
    rows = {}
    models = {"mocan": ev["scores"], **ev.get("baselines", {})}
    kls = {"mocan": (ev["kl"]["achieved"], ev["kl"]["achieved_ci"]),
           **{m: (k["achieved"], k["achieved_ci"]) for m, k in ev.get("baselines_kl", {}).items()}}
    for m, sc in models.items():
        name_in_behaviour = "trained" if m == "mocan" else m
        row = {"reward_gain": sc["reward"]["achieved_gain"], "reward_gain_ci": sc["reward"]["achieved_gain_ci"]}
        for c in safety_cols:
            e = sc[c]
            row[f"{c}_gain"], row[f"{c}_gain_ci"] = e["achieved_gain"], e["achieved_gain_ci"]
            row[f"{c}_unsafe_rate"] = e.get("unsafe_rate_trained")
            mg = targets.get(c)
            if mg is not None:
                row[f"{c}_holds"] = ("yes" if e["achieved_gain"] >= mg else
                                     "within CI" if e["achieved_gain_ci"][1] >= mg else "no")
        row["refusal"] = _behaviour_rate(ev.get("behaviour"), "harmful", name_in_behaviour)
        row["over_refusal"] = _behaviour_rate(ev.get("behaviour"), "benign", name_in_behaviour)
        row["over_refusal_borderline"] = _behaviour_rate(ev.get("behaviour"), "borderline", name_in_behaviour)
        if m in kls:
            row["kl"], row["kl_ci"] = float(kls[m][0]), list(kls[m][1])
        rows[m] = row
    ref = {"refusal": _behaviour_rate(ev.get("behaviour"), "harmful", "reference"),
           "over_refusal": _behaviour_rate(ev.get("behaviour"), "benign", "reference"),
           "over_refusal_borderline": _behaviour_rate(ev.get("behaviour"), "borderline", "reference"),
           **{f"{c}_unsafe_rate": ev["scores"][c].get("unsafe_rate_reference") for c in safety_cols}}
    # compute: MoCAN's own stages up to its training; evaluation is shared and not counted
    from ..models.loading import load_tokenizer
    from . import stages as S

    tok = load_tokenizer(cfg.policy)
    mocan_pairs = pd.read_parquet(run / "pairs.parquet")
    tcfg_tokens = trained_tokens(tok, mocan_pairs, S.train_config(run, cfg))
    pair_src = run / "pairs_source" / "samples.parquet"
    # π_ref's samples and, when MoCAN relabels a dataset, both responses of every pair
    scored = len(samples) + (len(pd.read_parquet(pair_src, columns=["prompt_id"])) if pair_src.exists() else 0)
    compute = {"mocan": {"wall_s": json.loads((run / "compare_info.json").read_text())["wall_s"],
                         "generated_tokens": gen, "scored_responses": int(scored * n_scorers),
                         "trained_tokens": tcfg_tokens}}
    for m, info in rivals.items():
        compute[m] = {"wall_s": float(info["wall_s"]), "generated_tokens": int(info.get("generated_tokens", 0)),
                      "scored_responses": int(info.get("scored_responses", 0)),
                      "trained_tokens": int(info.get("trained_tokens", 0))}
    if "p_sacpo" in compute and "sacpo" in compute:
        # P-SACPO interpolates SACPO's trained stages: it costs SACPO's training (found trained
        # when SACPO ran first) plus the interpolation
        compute["p_sacpo"]["wall_s"] += compute["sacpo"]["wall_s"]
    mean_resp = max(gen / max(len(samples), 1), 1.0)
    for c in compute.values():
        # dense-equivalent estimates: 2N FLOPs per token forward, 6N per trained token (an upper
        # bound with LoRA and frozen blocks); scorers counted at the policy's size (the demo's
        # heads sit on SmolLM2 itself); prompt tokens of sampling and scoring are not counted
        c["flops_sampling"] = 2.0 * n_params * c["generated_tokens"]
        c["flops_scoring"] = 2.0 * n_params * c["scored_responses"] * mean_resp
        c["flops_training"] = 6.0 * n_params * c["trained_tokens"]
        c["flops_total"] = c["flops_sampling"] + c["flops_scoring"] + c["flops_training"]
    for m in rows:
        rows[m]["compute"] = compute.get(m, {})
    return {"models": rows, "reference": ref, "margins": margins, "targets": targets, "lambda": list(dual.lam),
            "n_eval_prompts": ev["n_eval_prompts"], "n_params": n_params}


def aggregate(per_seed: dict, cfg: CompareConfig) -> dict:
    """Mean ± sd over seeds of every numeric entry of the seeds' rows (sd 0 with one seed)."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    # the held-out target of each constraint, averaged over the seeds (each seed's λ* sets its own)
    targets = {c: float(np.mean([per_seed[s]["targets"][c] for s in seeds])) for c in first["targets"]}
    out = {"seeds": seeds, "methods": list(first["models"]), "margins": first["margins"], "targets": targets,
           "reference": first["reference"], "per_seed": {str(s): v for s, v in per_seed.items()}, "summary": {}}
    for m in first["models"]:
        rows = [per_seed[s]["models"][m] for s in seeds if m in per_seed[s]["models"]]
        summ = {}
        keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for k in keys:
            vals = np.array([r[k] for r in rows if r.get(k) is not None], dtype=float)
            summ[k] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        for k, v in rows[0].items():
            if k.endswith("_ci") and len(rows) == 1:
                summ[k] = v
            if k.endswith("_holds"):
                summ[k] = [r[k] for r in rows]
        comp = {}
        for k in rows[0].get("compute", {}):
            vals = np.array([r["compute"][k] for r in rows], dtype=float)
            comp[k] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        summ["compute"] = comp
        out["summary"][m] = summ
    return out


def mean_sd_text(e: dict | None, fmt: str = "{:+.2f}", pct: bool = False) -> str:
    """A summary entry {mean, sd} as "mean ± sd" (the sd left out when 0: one seed); "-" for None;
    `pct`: both as whole percentages."""
    if e is None:
        return "-"
    f = (lambda x: f"{100 * x:.0f}%") if pct else fmt.format
    return f(e["mean"]) + (f" ± {f(e['sd']).lstrip('+')}" if e["sd"] else "")


def format_compare_table(record: dict) -> str:
    """compare.md: one row per method, mean ± sd over seeds (95% CI with one seed)."""
    safety = [k[:-len("_gain")] for k in next(iter(record["summary"].values())) if k.endswith("_gain")
              and k != "reward_gain"]
    one = len(record["seeds"]) == 1
    head = ["method", "reward gain"] + [f"{c} gain" for c in safety] + [f"{c} unsafe" for c in safety] + \
        ["constraint holds", "refusal (harmful)", "over-refusal (benign)", "over-refusal (borderline)", "KL",
         "wall", "gen. tokens", "trained tokens", "FLOPs (sample / score / train)"]
    lines = [f"Comparison over seed(s) {', '.join(map(str, record['seeds']))}: gains over π_ref on the same held-out "
             f"prompts ({'95% CI' if one else 'mean ± sd over seeds'}); the constraint holds where the held-out "
             "gain reaches what π_λ* is predicted to gain on these prompts: "
             + ", ".join(f"{k} {record['targets'][k]:+.3g} (margin {v:.3g} on the dual's prompts)"
                         for k, v in record["margins"].items() if v is not None), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = record["reference"]
    lines.append("| π_ref | 0 | " + " | ".join("0" for _ in safety) + " | "
                 + " | ".join(f"{100 * ref.get(f'{c}_unsafe_rate') or 0:.0f}%" for c in safety)
                 + " | | " + " | ".join("-" if ref.get(k) is None else f"{100 * ref[k]:.0f}%"
                                        for k in ("refusal", "over_refusal", "over_refusal_borderline"))
                 + " | 0 | | | | |")
    for m, s in record["summary"].items():
        def cell(k, s=s):
            e = s.get(k)
            if e is None:
                return "-"
            ci = s.get(f"{k}_ci")
            return f"{e['mean']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if one and ci else mean_sd_text(e)
        holds = "; ".join(f"{', '.join(s[f'{c}_holds'])}" for c in safety if f"{c}_holds" in s) or "-"
        c = s.get("compute", {})
        fl = lambda k, c=c: f"{c[k]['mean']:.2g}" if k in c else "-"  # noqa: E731
        row = [LABELS.get(m, m), cell("reward_gain")] + [cell(f"{x}_gain") for x in safety] + \
            [mean_sd_text(s.get(f"{x}_unsafe_rate"), pct=True) for x in safety] + [holds] + \
            [mean_sd_text(s.get(k), pct=True) for k in ("refusal", "over_refusal", "over_refusal_borderline")] + \
            [mean_sd_text(s.get("kl"), "{:.2f}"),
             (f"{c['wall_s']['mean'] / 60:.1f} min" if "wall_s" in c else "-"),
             (f"{c['generated_tokens']['mean']:,.0f}" if "generated_tokens" in c else "-"),
             (f"{c['trained_tokens']['mean']:,.0f}" if "trained_tokens" in c else "-"),
             f"{fl('flops_sampling')} / {fl('flops_scoring')} / {fl('flops_training')}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Compute counts each method's own work up to a trained model (MoCAN: sampling, scoring, the "
              "dual, labels and training; the evaluation every method shares is not counted). FLOPs are "
              "dense-equivalent estimates: 2N per generated or scored token, 6N per trained token, N the "
              "policy's parameters."]
    return "\n".join(lines)
