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


@dataclass
class MoCANConfig:
    """Everything a MoCAN run depends on (DESIGN.md §3).

    Attributes
    ----------
    out : run directory; every artifact lands here, and a rerun resumes from it.
    policy : the reference policy π_ref: HF id, local dir, .gguf file or the embedded default.
    reward : reward scorer spec (see `dualign score`).
    safety : constraint name → scorer spec, with its sign declared (`cost:`/`safety:` prefix
        or the scorer's own config).
    margins : constraint name → required gain over π_ref; constraints left out get
        `margin_fraction` × their largest achievable gain (shown before training).
    margin_fraction : fraction of the largest achievable gain used as the margin of
        constraints without one.
    prompts, prompt_column, prompt_split : prompts for sampling, the dual and training
        (`prompt_split` filters a `split` column when the file has one).
    eval_prompts, eval_split : held-out prompts for evaluation (default: `prompts`).
    max_prompts, max_eval_prompts : use only the first so many (0: all).
    num_samples : K responses per prompt from π_ref for the dual.
    max_new_tokens, temperature, top_p, seed, sample_batch_size : generation settings,
        identical for the dual's samples and for evaluation.
    beta : KL coefficient β, shared by the dual and the training loss.
    bootstrap : bootstrap replicates for the dual's CIs.
    pairs : "samples" (pairs of π_ref's own responses) or a preference dataset file
        (PKU-SafeRLHF or prompt/chosen/rejected schema) whose responses are re-scored and
        relabeled, as in the paper.
    pairs_per_prompt : pairs drawn per prompt when `pairs` is "samples".
    max_pairs : use at most this many dataset pairs (0: all).
    eval_num_samples : responses per eval prompt and model.
    train : `PreferenceConfig` fields (learning rate, epochs, LoRA, ...).
    """

    out: str = "runs/mocan"
    policy: str = EMBEDDED_DEFAULT
    reward: str = ""
    safety: dict = field(default_factory=dict)
    margins: dict = field(default_factory=dict)
    margin_fraction: float = 0.5
    prompts: str = ""
    prompt_column: str = "prompt"
    prompt_split: str | None = None
    eval_prompts: str | None = None
    eval_split: str | None = None
    max_prompts: int = 0
    max_eval_prompts: int = 0
    num_samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.9
    seed: int = 0
    sample_batch_size: int = 16
    beta: float = 0.1
    bootstrap: int = 1000
    pairs: str = "samples"
    pairs_per_prompt: int = 2
    max_pairs: int = 0
    eval_num_samples: int = 2
    train: dict = field(default_factory=dict)

    def validate(self) -> "MoCANConfig":
        if not self.prompts:
            raise InputError("no prompts: set `prompts` (a file of prompts)", field="prompts")
        if not self.reward:
            raise InputError("no reward model: set `reward` (a scorer spec)", field="reward")
        if not self.safety:
            raise InputError("no safety model: set `safety` (NAME: SPEC)", field="safety")
        unknown = sorted(set(self.margins) - set(self.safety))
        if unknown:
            raise InputError(f"margin for unknown constraint(s) {', '.join(unknown)}; constraints are "
                             f"{', '.join(self.safety)}", field="margins")
        if not self.beta > 0:
            raise InputError(f"must be > 0, got {self.beta}", field="beta")
        if self.num_samples < 2:
            raise InputError(f"the dual needs >= 2 samples per prompt, got {self.num_samples}",
                             field="num_samples")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    for k, v in (overrides or {}).items():
        if k.startswith("train."):
            data.setdefault("train", {})
            data["train"] = dict(data["train"] or {}, **{k[len("train."):]: v})
        else:
            data[k] = v
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}", file=str(path) if path else None,
                         field=unknown[0])
    return cls(**data)


def field_docs(cls) -> dict[str, str]:
    """Field name → its description, read from the class docstring's Attributes section
    (`name[, name...] : text` lines, text continuing on indented lines)."""
    import inspect
    import re

    docs, names = {}, []
    for line in inspect.getdoc(cls).splitlines():
        m = re.match(r"^([a-z_]+(?:, [a-z_]+)*) : (.*)$", line)
        if m:
            names = m.group(1).split(", ")
            for n in names:
                docs[n] = m.group(2)
        elif line.startswith("    ") and names:
            for n in names:
                docs[n] += " " + line.strip()
        else:
            names = []
    return docs


def add_config_flags(parser, cls) -> None:
    """One flag per dataclass field (`--num-samples`), plus `--train.FIELD` for training."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        if f.name == "train":
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


def overrides_from_args(args, extra: list[str]) -> dict:
    """Flags given on the command line (None = not given), dict flags parsed as NAME=VALUE,
    and `--train.FIELD VALUE` pairs from the unparsed arguments (values parsed as YAML)."""
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
                d[key] = yaml.safe_load(val) if name == "margins" else val
            v = d
        out[name] = v
    it = iter(extra)
    for tok in it:
        if not tok.startswith("--train."):
            raise InputError(f"unrecognized argument '{tok}'")
        key, sep, val = tok[2:].partition("=")
        if not sep:
            val = next(it, None)
            if val is None:
                raise InputError(f"{tok} needs a value")
        out[key] = yaml.safe_load(val)
    return out
