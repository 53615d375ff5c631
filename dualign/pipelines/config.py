"""Pipeline configs: dataclasses that map 1:1 onto YAML files and onto CLI flags.

`--config run.yaml` loads a file; every field is also a flag (`--num-samples 8`, nested
training settings as `--train.learning_rate 5e-5`), and flags win over the file.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import InputError
from ..models.loading import EMBEDDED_DEFAULT
from ..runio import check_name


OUT_HELP = "run directory; every artifact lands here, and a rerun resumes from it."


@dataclass
class PipelineConfig:
    """Settings MoCAN and PeCAN share: the reference, prompts, generation, the dual, training.

    Each field's help is in its metadata (`--help` of the commands shows it).
    """

    # dict fields whose entries are also flags `--NAME.FIELD VALUE` (see `load_config`)
    NESTED: typing.ClassVar[tuple[str, ...]] = ("train",)

    out: str = field(default="runs/run", metadata={"help": OUT_HELP})
    policy: str = field(default=EMBEDDED_DEFAULT, metadata={"help": (
        "the reference policy π_ref: HF id, local dir, .gguf file or the embedded default.")})
    reward: str = field(default="", metadata={"help": (
        "reward scorer spec (see `dualign score`); a `file.py:function` spec imports and runs that "
        "file's code, as `python file.py` would; only use files you trust.")})
    safety: dict = field(default_factory=dict, metadata={"help": (
        "constraint name → scorer spec, with its sign declared (`cost:`/`safety:` prefix or the "
        "scorer's own config); a `file.py:function` spec imports and runs that file's code, as "
        "`python file.py` would; only use files you trust.")})
    margins: dict = field(default_factory=dict, metadata={"help": (
        "constraint name → required gain over π_ref; constraints left out get `margin_fraction` × "
        "their largest achievable gain (shown before training).")})
    max_unsafe_rate: dict = field(default_factory=dict, metadata={"help": (
        "constraint name → the largest unsafe rate allowed instead of a margin, e.g. {harm: 0.05}: at "
        "most 5% unsafe answers (unsafe: safety score < 0, the rule of every reported unsafe rate); "
        "the dual bounds the rate of π_λ* directly and shows the predicted rate before training. A "
        "constraint takes a margin or a rate, not both.")})
    margin_fraction: float = field(default=0.5, metadata={"help": (
        "fraction of the largest achievable gain used as the margin of constraints without one (nor a "
        "rate).")})
    prompts: str = field(default="", metadata={"help": (
        "prompts for sampling, the dual and training (`prompt_split` filters a `split` column when "
        "the file has one).")})
    prompt_column: str = field(default="prompt", metadata={"help": (
        "column of the prompts file that holds the prompt text.")})
    prompt_split: str | None = field(default=None, metadata={"help": (
        "keep only the prompts whose `split` column has this value (when the file has one).")})
    eval_prompts: str | None = field(default=None, metadata={"help": (
        "held-out prompts for evaluation (default: `prompts`).")})
    eval_split: str | None = field(default=None, metadata={"help": (
        "keep only the evaluation prompts whose `split` column has this value.")})
    max_prompts: int = field(default=0, metadata={"help": (
        "use only the first so many prompts (0: all).")})
    max_eval_prompts: int = field(default=0, metadata={"help": (
        "use only the first so many evaluation prompts (0: all).")})
    num_samples: int = field(default=4, metadata={"help": (
        "K responses per prompt from π_ref for the dual.")})
    max_new_tokens: int = field(default=64, metadata={"help": (
        "most tokens per response, for the dual's samples and for evaluation alike.")})
    temperature: float = field(default=1.0, metadata={"help": (
        "sampling temperature, for the dual's samples and for evaluation alike.")})
    top_p: float = field(default=0.9, metadata={"help": (
        "nucleus mass, for the dual's samples and for evaluation alike.")})
    seed: int = field(default=0, metadata={"help": (
        "seed of sampling, of the bootstrap and of training.")})
    sample_batch_size: int = field(default=16, metadata={"help": (
        "responses generated per batch.")})
    beta: float = field(default=0.1, metadata={"help": (
        "KL coefficient β, shared by the dual and the training loss.")})
    bootstrap: int = field(default=1000, metadata={"help": (
        "bootstrap replicates for the dual's CIs.")})
    pairs: str = field(default="samples", metadata={"help": (
        "which response pairs get pseudo-preference labels (see the subclasses).")})
    pairs_per_prompt: int = field(default=2, metadata={"help": (
        "pairs drawn per prompt when `pairs` is \"samples\".")})
    max_pairs: int = field(default=0, metadata={"help": (
        "use at most this many dataset pairs (0: all).")})
    eval_num_samples: int = field(default=2, metadata={"help": (
        "responses per eval prompt and model.")})
    reference_eval_samples: int = field(default=0, metadata={"help": (
        "π_ref's responses per eval prompt (0: `eval_num_samples`). The held-out prediction reweights "
        "them, and a reweighting of K samples per prompt under-predicts how far π_λ* moves (its KL is "
        "at most log K): `num_samples` makes it as good as the dual's own.")})
    behaviour_suites: list | str | None = field(default=None, metadata={"help": (
        "extra prompt suites of the behavioural evaluation (refusal of harmful prompts, over-refusal "
        "of benign ones, judged without the training's score models): `NAME=KIND:FILE` (KIND harmful, "
        "benign or borderline) or a built-in name (harmful, benign, borderline); a list, or "
        "comma-separated. Default: borderline when the evaluation prompts are the built-in demo "
        "prompts, else none (\"none\": none). Eval prompts with a `harmful` field also give the harmful "
        "and benign suites, on the evaluation's own samples. Sampled like the evaluation, "
        "`max_eval_prompts` each.")})
    behaviour_detector: str = field(default="phrases", metadata={"help": (
        "refusal detector of the behavioural evaluation: phrases (default), "
        "hf-classifier:PATH_OR_ID[:LABEL] or guard:PATH_OR_ID.")})
    train: dict = field(default_factory=dict, metadata={"help": (
        "`PreferenceConfig` fields (learning rate, epochs, LoRA, ...).")})

    def _validate_common(self, constraints) -> None:
        """Checks every pipeline needs; `constraints` are the names margins may refer to."""
        if not self.prompts:
            raise InputError("no prompts: set `prompts` (a file of prompts)", field="prompts")
        unknown = sorted(set(self.margins) - set(constraints))
        if unknown:
            raise InputError(f"margin for unknown constraint(s) {', '.join(unknown)}; constraints are "
                             f"{', '.join(constraints)}", field="margins")
        self._validate_max_unsafe_rate(constraints)
        self._validate_behaviour()
        if not self.beta > 0:
            raise InputError(f"must be > 0, got {self.beta}", field="beta")
        if self.num_samples < 2:
            raise InputError(f"the dual needs >= 2 samples per prompt, got {self.num_samples}",
                             field="num_samples")
        if self.reference_eval_samples and self.reference_eval_samples < self.eval_num_samples:
            raise InputError(f"must be 0 or >= eval_num_samples ({self.eval_num_samples}): π_ref is sampled at "
                             f"least as often as the trained model; got {self.reference_eval_samples}",
                             field="reference_eval_samples")
        self._validate_training("train")

    def reference_eval_count(self) -> int:
        """π_ref's responses per eval prompt (`reference_eval_samples`, or `eval_num_samples`)."""
        return self.reference_eval_samples or self.eval_num_samples

    def _validate_training(self, section: str) -> None:
        """Training settings (`section`: "train", or PeCAN's "pre_align", which sits on top of
        "train") are checked now, not at the training stage after sampling and scoring (hours
        on a 7B model): a misspelled key gets the closest valid name."""
        from ..train.preference import PreferenceConfig

        settings = getattr(self, section)
        if isinstance(settings, dict):  # anything else: from_dict names the section
            base = self.train if section != "train" else {}
            settings = {**base, **settings, "beta": self.beta, "output_dir": str(Path(self.out) / "train")}
        PreferenceConfig.from_dict(settings, section=section)

    def _validate_max_unsafe_rate(self, constraints) -> None:
        """`max_unsafe_rate` is a mapping of known constraint names to rates in [0, 1], none of
        which also has a margin.

        Raises
        ------
        InputError
            Naming the field and the offending constraint."""
        from ..dual import check_unsafe_rate

        rates = self.max_unsafe_rate
        if not isinstance(rates, dict):
            raise InputError(f"expected a mapping NAME: RATE (e.g. harm: 0.05), got {rates!r}",
                             field="max_unsafe_rate")
        unknown = sorted(set(rates) - set(constraints))
        if unknown:
            raise InputError(f"max unsafe rate for unknown constraint(s) {', '.join(map(str, unknown))}; "
                             f"constraints are {', '.join(constraints)}", field="max_unsafe_rate")
        both = sorted(set(rates) & set(self.margins))
        if both:
            raise InputError(f"constraint(s) {', '.join(both)} have both a margin and a max unsafe rate: "
                             "give one", field="max_unsafe_rate")
        for name, r in rates.items():
            check_unsafe_rate(r, name)

    def _validate_behaviour(self) -> None:
        """The behavioural evaluation's suites and detector parse (suite files are read now,
        not after training). Raises InputError naming the setting."""
        from ..eval.behaviour import load_detector, parse_suite_specs, suite_specs_setting

        parse_suite_specs(suite_specs_setting(self.behaviour_suites, self.eval_prompts or self.prompts),
                          field="behaviour_suites")
        load_detector(self.behaviour_detector)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

@dataclass
class MoCANConfig(PipelineConfig):
    """Everything a MoCAN run depends on (docs/design.md §4): `PipelineConfig`'s fields, where
    `reward` and `safety` (the score models the dual and the labels use) are required.

    Each field's help is in its metadata (`--help` of the commands shows it).
    """

    out: str = field(default="runs/mocan", metadata={"help": OUT_HELP})

    pairs: str = field(default="samples", metadata={"help": (
        "\"samples\" (pairs of π_ref's own responses) or a preference dataset file (PKU-SafeRLHF or "
        "prompt/chosen/rejected schema) whose responses are re-scored and relabeled, as in the paper.")})
    max_unsafe_rate: dict = field(default_factory=dict, metadata={"help": (
        "constraint name → the largest unsafe rate allowed (e.g. harm=0.05), instead of a margin: λ* "
        "of that constraint multiplies −1{unsafe} in the pair labels (the score the dual solved for), "
        "and the evaluation compares the trained model's unsafe rate with the predicted one.")})

    def validate(self) -> "MoCANConfig":
        if not self.prompts:
            raise InputError("no prompts: set `prompts` (a file of prompts)", field="prompts")
        if not self.reward:
            raise InputError("no reward model: set `reward` (a scorer spec)", field="reward")
        if not self.safety:
            raise InputError("no safety model: set `safety` (NAME: SPEC)", field="safety")
        self._validate_common(list(self.safety))
        return self


@dataclass
class PeCANConfig(PipelineConfig):
    """Everything a PeCAN run depends on (docs/design.md §4): `PipelineConfig`'s fields plus the
    preference data (or pre-aligned checkpoints) the implicit scores come from.

    Each field's help is in its metadata (`--help` of the commands shows it).
    """

    NESTED: typing.ClassVar[tuple[str, ...]] = ("train", "pre_align")
    HARMLESS: typing.ClassVar[str] = "harmless"

    out: str = field(default="runs/pecan", metadata={"help": OUT_HELP})
    pairs: str = field(default="preferences", metadata={"help": (
        "\"preferences\" (default: every pair of the preference files, relabeled with λ*, as in the "
        "paper), \"samples\" (pairs of π_ref's own responses) or another preference file.")})
    preferences: str = field(default="", metadata={"help": (
        "one PKU-SafeRLHF-schema file with both labels on each pair: `better_response_id` trains "
        "DPO_H (π_r), `safer_response_id` trains DPO_S (π_g, constraint \"harmless\").")})
    helpful_preferences: str = field(default="", metadata={"help": (
        "instead of `preferences`: the helpfulness set (`better_response_id`, or a TRL "
        "prompt/chosen/rejected file).")})
    safety_preferences: dict = field(default_factory=dict, metadata={"help": (
        "instead of `preferences`: constraint name → safety set (`safer_response_id`, or a TRL "
        "prompt/chosen/rejected file); one DPO_S per set.")})
    helpful_model: str = field(default="", metadata={"help": (
        "an existing pre-aligned π_r to reuse instead of training DPO_H (a `train/model` folder of "
        "dualign, a training output folder, or any model spec).")})
    safety_models: dict = field(default_factory=dict, metadata={"help": (
        "constraint name → an existing pre-aligned π_g to reuse.")})
    pre_align: dict = field(default_factory=dict, metadata={"help": (
        "`PreferenceConfig` fields for DPO_H and DPO_S; unset ones come from `train` (β is always "
        "`beta`; labels are the hard 0/1 preferences: plain DPO).")})
    label_scale: str = field(default="consistent", metadata={"help": (
        "\"consistent\" (default; \"beta\" in earlier versions): p = σ(Δr̂ + λ*ᵀΔĝ) with r̂ = "
        "β·log π_r/π_ref, whose DPO optimum is π_λ* = "
        "π_ref (π_r/π_ref)(π_g/π_ref)^λ*, the policy the dual's predictions describe. \"paper\": the "
        "paper's code, without β inside σ: p = σ((Δr̂ + λ*ᵀΔĝ)/β), whose optimum is π_ref exp((r̂ + "
        "λ*ᵀĝ)/β²), a sharper policy than the dual solved for (its predictions do not apply to it).")})
    reward: str = field(default="", metadata={"help": (
        "optional reward model for evaluation only (column `scorer/reward`); a `file.py:function` "
        "spec imports and runs that file's code, as `python file.py` would; only use files you trust.")})
    safety: dict = field(default_factory=dict, metadata={"help": (
        "optional constraint name → cost/safety model spec for evaluation only (columns "
        "`scorer/safety/<name>`); a `file.py:function` spec runs code likewise.")})
    margins: dict = field(default_factory=dict, metadata={"help": (
        "constraint name → required gain of the implicit safety score ĝ over π_ref (in ĝ's units: β × "
        "nats); left out: `margin_fraction` × the largest achievable.")})
    max_unsafe_rate: dict = field(default_factory=dict, metadata={"help": (
        "not for PeCAN: the dual's safety scores are the implicit ĝ = β·log π_g/π_ref, defined up to "
        "a per-prompt constant, so their sign — and an unsafe rate — means nothing (the `safety` "
        "scorers here only judge the result); state the constraint as a margin.")})
    max_pairs: int = field(default=0, metadata={"help": (
        "read at most this many records of each preference file, for pre-alignment and relabeling (0: "
        "all).")})

    def helpful_source(self) -> str:
        """The helpfulness preference file ("" when only a checkpoint is given)."""
        return self.helpful_preferences or self.preferences

    def safety_sources(self) -> dict[str, str]:
        """Constraint name → safety preference file ("" where only a checkpoint is given)."""
        files = dict(self.safety_preferences) or ({self.HARMLESS: self.preferences} if self.preferences else {})
        return {**{n: "" for n in self.safety_models}, **files}

    def validate(self) -> "PeCANConfig":
        if not self.prompts:
            raise InputError("no prompts: set `prompts` (a file of prompts)", field="prompts")
        for section in ("safety_preferences", "safety_models"):
            value = getattr(self, section)
            if not isinstance(value, dict):
                raise InputError(f"expected a mapping NAME: PATH, got {value!r}", field=section)
            for name in value:  # each names folders: pre_align/safety_<name>, eval/dpo_s_<name>
                check_name(name, section)
        if self.preferences and (self.helpful_preferences or self.safety_preferences):
            raise InputError("give `preferences` (both labels in one file) or `helpful_preferences` "
                             "and `safety_preferences`, not both", field="preferences")
        if not (self.helpful_source() or self.helpful_model):
            raise InputError("no helpfulness preferences: set `preferences` (PKU-SafeRLHF schema, with "
                             "better_response_id and safer_response_id), `helpful_preferences`, or a "
                             "pre-aligned `helpful_model`", field="preferences")
        if not self.safety_sources():
            raise InputError("no safety preferences: set `preferences`, `safety_preferences` (NAME: FILE) "
                             "or pre-aligned `safety_models` (NAME: DIR)", field="safety_preferences")
        if self.label_scale == "beta":  # the name earlier versions gave the consistent labels
            self.label_scale = "consistent"
        if self.label_scale not in ("consistent", "paper"):
            raise InputError(f"must be 'consistent' or 'paper', not {self.label_scale!r}", field="label_scale")
        if self.max_unsafe_rate:
            raise InputError("PeCAN's safety scores are implicit (β·log π_g/π_ref, defined up to a per-prompt "
                             "constant): they have no meaningful sign, so no unsafe rate to bound; state the "
                             "constraint as a margin (`margins`)", field="max_unsafe_rate")
        if self.pairs == "preferences" and not (self.helpful_source() or any(self.safety_sources().values())):
            raise InputError("pairs 'preferences' needs preference files; with only pre-aligned models "
                             "set `pairs: samples` or a preference file", field="pairs")
        self._validate_common(list(self.safety_sources()))
        self._validate_training("pre_align")
        return self


def load_config(cls, path=None, overrides: dict | None = None):
    """Build `cls` from a YAML file and `overrides` (which win); unknown keys raise InputError."""
    data = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise InputError("no such file", file=str(p))
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise InputError(f"invalid YAML ({str(e).splitlines()[0]})", file=str(p)) from None
        if not isinstance(data, dict):
            raise InputError("expected a mapping of settings", file=str(p))
    nested = getattr(cls, "NESTED", ("train",))
    for k, v in (overrides or {}).items():
        head, dot, key = k.partition(".")
        if dot and head in nested:  # `train.learning_rate`: one entry of a nested mapping
            data[head] = dict(data.get(head) or {}, **{key: v})
        else:
            data[k] = v
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}", file=str(path) if path else None,
                         field=unknown[0])
    cfg = cls(**data)
    if path is not None:  # not a field: config.json and every stage key stay as they were
        object.__setattr__(cfg, "source_file", str(path))
    return cfg


def validated(cfg):
    """`cfg.validate()`, with the YAML file the settings came from (`load_config`) named in an
    error that names no file: a typo in `train:` reads `cfg.yaml: field 'train.learning_rat': ...`.

    Raises
    ------
    InputError
        As `cfg.validate()`.
    """
    try:
        return cfg.validate()
    except InputError as e:
        source = getattr(cfg, "source_file", None)
        if e.file is not None or source is None:
            raise
        err = InputError(str(e), file=source)
        err.field, err.record = e.field, e.record
        raise err from None


def field_docs(cls) -> dict[str, str]:
    """Field name → its help (`field(metadata={"help": ...})`; a subclass that redeclares a
    field with its own help wins, as dataclasses keep the last declaration)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def add_config_flags(parser, cls, exclude: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (`--num-samples`) but those in `exclude`, plus
    `--NAME.FIELD` for the entries of the nested mappings in `cls.NESTED`
    (`--train.learning_rate 5e-5`)."""
    hints = typing.get_type_hints(cls)
    nested = getattr(cls, "NESTED", ("train",))
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        if f.name in nested or f.name in exclude:
            continue
        if t is dict or typing.get_origin(t) is dict:
            parser.add_argument(flag, action="append", metavar="NAME=VALUE", dest=f"cfg_{f.name}",
                                help=docs.get(f.name, "") + " (repeatable)")
        else:
            base = t if t in (int, float, str) else str
            default = "" if f.default in ("", None) else f" (default: {f.default})"
            parser.add_argument(flag, type=base, dest=f"cfg_{f.name}", default=None,
                                metavar=f.name.upper(), help=docs.get(f.name, "") + default)
    parser.add_argument("--train.FIELD", dest="_train_help", metavar="VALUE",
                        help="any training setting, e.g. --train.learning_rate 5e-5 --train.num_train_epochs 2")
    for name in nested:
        if name != "train":
            parser.add_argument(f"--{name}.FIELD", dest=f"_{name}_help", metavar="VALUE",
                                help=docs.get(name, "") + f" (one entry: --{name}.learning_rate 5e-5)")


def overrides_from_args(args, extra: list[str], nested: tuple[str, ...] = ("train",)) -> dict:
    """Flags given on the command line (None = not given), dict flags parsed as NAME=VALUE,
    and `--NAME.FIELD VALUE` pairs (NAME one of `nested`, e.g. `--train.learning_rate 5e-5`)
    from the unparsed arguments (values parsed as YAML)."""
    out = {}
    for k, v in vars(args).items():
        if not k.startswith("cfg_") or v is None:
            continue
        name = k[4:]
        if isinstance(v, list):
            d = {}
            for item in v:
                key, sep, val = item.partition("=")
                if not sep:
                    raise InputError(f"expected NAME=VALUE, got '{item}'", field=f"--{name}")
                d[key] = yaml.safe_load(val) if name in ("margins", "max_unsafe_rate") else val
            v = d
        out[name] = v
    it = iter(extra)
    for tok in it:
        head, dot, _ = tok[2:].partition(".")
        head = head.replace("-", "_")
        if not (tok.startswith("--") and dot and head in nested):
            raise InputError(f"unrecognized argument '{tok}'")
        key, sep, val = tok[2:].partition("=")
        key = head + key[key.index("."):]
        if not sep:
            val = next(it, None)
            if val is None:
                raise InputError(f"{tok} needs a value")
        out[key] = yaml.safe_load(val)
    return out
