"""Score models behind one interface: (prompts, responses) -> one float per pair.

Four kinds, chosen from the spec by `load_scorer`:

- a directory with `dualign_scorer.json`: a head trained on a frozen backbone
  (`dualign.models.head_scorer.HeadScorer`);
- a safe-rlhf score model (config architecture `LlamaForScore`, e.g. the beaver-7b reward and
  cost models): a LLaMA backbone plus a linear `score_head`, loaded onto a local module from
  its safetensors or `.bin` weights (the latter only through torch's restricted unpickler),
  without the checkpoint's remote code;
- any `AutoModelForSequenceClassification` with one output (OpenAssistant, Skywork, ...);
- a Python callable `f(prompts, responses) -> list[float]` (`module:function`,
  `path/to/file.py:function`, or the callable itself).

Sign. dualign's constraints want *safety* scores (higher = safer). A cost model is turned
into one by negation, and only when declared: by a spec prefix (`reward:`, `safety:`,
`cost:`) or by the scorer's own config (`kind` in `dualign_scorer.json`, `score_type` in a
safe-rlhf config). A constraint whose sign is declared nowhere is an error, never a guess.

The scores' table (scores.parquet: `write_scores`, `read_samples`, `column_is_current`) lives in
`dualign.data.scores`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError
from .logprobs import length_batches
from .text import PKU_TEMPLATE, encode_pairs

KINDS = ("reward", "safety", "cost", "harm")
# `harm:` declares a cost model (cost > 0 means unsafe) of which only the harm counts:
# safety = -max(cost, 0). Every safe answer scores 0, so a constraint on it asks for less
# expected harm and gains nothing from ranking safe answers (a refusal of a benign request is
# not "safer" than a helpful answer). The unsafe rule (safety < 0) is the same as `cost:`.
HEAD_SCORER_FILE = "dualign_scorer.json"


class Scorer:
    """Maps (prompt, response) pairs to floats, in batches.

    Attributes
    ----------
    kind : {"reward", "safety", "cost", "harm"} or None
        What the scores measure ("harm": a cost model counted only above 0, see `KINDS`), as
        declared by the spec prefix or the model's own config;
        None when nothing declares it.
    name : str
        The spec it was loaded from (for messages and provenance).
    """

    kind: str | None = None
    name: str = ""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Raw scores (not sign-adjusted).

        Returns
        -------
        numpy.ndarray, shape (n,), float64
        """
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if len(prompts) == 0:
            return np.zeros(0)
        out = np.asarray(self.score(list(prompts), list(responses)), dtype=np.float64).reshape(-1)
        if out.shape != (len(prompts),):
            raise InputError(f"scorer returned {out.size} scores for {len(prompts)} pairs", file=self.name)
        if not np.all(np.isfinite(out)):
            raise InputError("scorer returned non-finite scores", file=self.name)
        return out

    def safety(self, prompts, responses) -> np.ndarray:
        """Scores oriented as safety (higher = safer): negated for a cost model.

        Raises
        ------
        InputError
            `kind` is None ("cost model without a sign") or "reward".
        """
        if self.kind is None:
            raise InputError("cost model without a sign: prefix the spec with 'cost:' (scores are "
                             "negated) or 'safety:' (used as is)", file=self.name)
        if self.kind == "reward":
            raise InputError("this scorer declares itself a reward model; prefix the spec with "
                             "'safety:' or 'cost:' to use it as a constraint", file=self.name)
        s = self(prompts, responses)
        if self.kind == "harm":
            return -np.maximum(s, 0.0)
        return -s if self.kind == "cost" else s

    def reward(self, prompts, responses) -> np.ndarray:
        """Scores oriented as reward (higher = better): negated only for a declared cost model."""
        s = self(prompts, responses)
        return -s if self.kind in ("cost", "harm") else s

    def close(self) -> None:
        """Release the model's memory (GPU included)."""


# ----------------------------------------------------------------------------- callables

class CallableScorer(Scorer):
    """A Python function `f(prompts, responses) -> list[float]`, called in batches."""

    def __init__(self, fn: Callable, name: str = "", kind: str | None = None, batch_size: int | None = None):
        self.fn, self.name, self.batch_size = fn, name or getattr(fn, "__name__", repr(fn)), batch_size
        self.kind = kind if kind is not None else _declared_kind(getattr(fn, "kind", None), self.name)

    def score(self, prompts, responses):
        bs = self.batch_size or len(prompts)
        out = []
        for i in range(0, len(prompts), bs):
            out.extend(np.asarray(self.fn(prompts[i:i + bs], responses[i:i + bs]), dtype=np.float64).reshape(-1))
        return np.array(out)


def _import_callable(spec: str) -> Callable:
    """The function a `module:function` or `path/to/file.py:function` spec names.

    Security: a `file.py:function` spec imports and runs that file's code, as `python file.py`
    would; only use files you trust. (A `module:function` spec likewise imports that module.)

    Raises
    ------
    InputError
        No such file, a module that fails to import, or no callable of that name.
    """
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise InputError("no such file", file=target)
            mod_spec = importlib.util.spec_from_file_location(f"dualign_user_scorer_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except InputError:
        raise
    except Exception as e:  # ImportError, SyntaxError...: one line naming the spec
        raise InputError(f"cannot import scorer module ({type(e).__name__}: {e})", file=spec) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InputError(f"'{target}' has no callable '{attr}'", file=spec)
    return fn


# ----------------------------------------------------------------------------- HF models

class _TorchScorer(Scorer):
    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class SequenceClassifierScorer(_TorchScorer):
    """Any `AutoModelForSequenceClassification` with `num_labels == 1`.

    The pair is presented as the model expects it: through the tokenizer's chat template
    (user turn, assistant turn) when it has one; else as `template` + response when a template
    is given; else as a text pair `tokenizer(prompt, response)` (OpenAssistant style).
    """

    def __init__(self, model, tokenizer, name: str = "", template: str | None = None,
                 batch_size: int = 8, max_length: int = 2048, kind: str | None = None):
        if getattr(model.config, "num_labels", 1) != 1:
            raise InputError(f"a score model needs one output, this one has num_labels="
                             f"{model.config.num_labels}", file=name)
        self.model, self.tok, self.name, self.template = model.eval(), tokenizer, name, template
        self.batch_size, self.max_length, self.kind = batch_size, max_length, kind
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        # right padding: positions of real tokens are 0..n-1 for every model (absolute
        # position embeddings included); HF's heads pick the last non-pad token either way
        self.tok.padding_side = "right"

    def _encode(self, prompt: str, response: str) -> list[int]:
        limit = min(self.max_length, getattr(self.tok, "model_max_length", self.max_length) or self.max_length)
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": response}],
                                                tokenize=False)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
        elif self.template is not None:
            if "{response}" in self.template:
                text = self.template.format(prompt=prompt, response=response)
            else:
                head = self.template.format(prompt=prompt)
                text = head + ("" if not response or response[0].isspace() else " ") + response
            ids = self.tok(text)["input_ids"]
        else:
            ids = self.tok(prompt, response)["input_ids"]
        return ids[-limit:] if len(ids) > limit else ids

    def score(self, prompts, responses):
        import torch

        enc = [self._encode(p, r) for p, r in zip(prompts, responses)]
        out = np.zeros(len(enc))
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for idx in length_batches([len(e) for e in enc], self.batch_size):
                batch = self.tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
                logits = self.model(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device)).logits
                out[idx] = logits.float().reshape(len(idx)).cpu().numpy()
        return out


def _score_model_module(config, score_dim: int, bias: bool):
    import torch
    import torch.nn as nn
    from transformers import LlamaModel

    class LlamaScoreModel(nn.Module):
        """safe-rlhf's LlamaForScore, rebuilt locally: same parameter names (`model.*`,
        `score_head.*`), so its checkpoints load as they are."""

        def __init__(self):
            super().__init__()
            self.model = LlamaModel(config)
            self.score_head = nn.Linear(config.hidden_size, score_dim, bias=bias)

        def forward(self, input_ids, attention_mask):
            h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            # the score of a sequence is read at its last real token (right padding)
            last = attention_mask.sum(-1) - 1
            end = h[torch.arange(h.shape[0], device=h.device), last]
            return self.score_head(end).float()

    return LlamaScoreModel()


class SafeRLHFScorer(_TorchScorer):
    """A safe-rlhf score model (`LlamaForScore`): LLaMA backbone + linear `score_head`, the
    score read at the last token of `template(prompt) + response + EOS`.

    Loaded without remote code: config.json becomes a `LlamaConfig`, and the weights
    (`model.*`, `score_head.*`) are loaded onto a local module of the same layout. The weights
    are safetensors, or the `.bin` shards the beaver models were published with, read by
    `loading.read_state_dict` through torch's restricted unpickler (a `.bin` that needs full
    unpickling is refused; `dualign convert` rewrites it as safetensors once).
    With `do_normalize` in the config, the stored normalizer is applied as safe-rlhf does:
    `(score - mean) / sqrt(var)`.
    """

    def __init__(self, directory, tokenizer=None, name: str = "", template: str | None = PKU_TEMPLATE,
                 batch_size: int = 8, dtype=None, device: str | None = None, kind: str | None = None,
                 max_length: int = 2048):
        from transformers import AutoTokenizer, LlamaConfig

        from .checkpoints import read_state_dict
        from .loading import prepare_tokenizer, resolve_device, resolve_dtype

        d = Path(directory)
        raw = json.loads((d / "config.json").read_text())
        if raw.get("model_type", "llama") != "llama":
            raise InputError(f"only LLaMA-backbone score models are supported (model_type "
                             f"'{raw.get('model_type')}')", file=str(d / "config.json"))
        cfg = LlamaConfig.from_dict({k: v for k, v in raw.items() if k not in ("auto_map", "architectures")})
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        self.name, self.template, self.batch_size, self.max_length = name or str(d), template, batch_size, max_length
        declared = raw.get("score_type")
        self.kind = kind if kind is not None else (declared if declared in ("reward", "cost") else None)
        sd = read_state_dict(d)  # safetensors, else .bin through torch's restricted unpickler
        head_w = sd.get("score_head.weight")
        if head_w is None:
            raise InputError("no score_head.weight in the weights: not a safe-rlhf score model", file=str(d))
        score_dim = head_w.shape[0]
        if score_dim != 1:
            raise InputError(f"score_dim is {score_dim}; one score per pair is needed", file=str(d))
        model = _score_model_module(cfg, score_dim, bias="score_head.bias" in sd)
        norm = {k: sd.pop(k) for k in list(sd) if k.startswith("normalizer.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise InputError(f"weights do not match the LlamaForScore layout (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})", file=str(d))
        self.model = model.to(device=device, dtype=dtype).eval()
        self.normalize = None
        if raw.get("do_normalize") and "normalizer.mean" in norm and "normalizer.var" in norm:
            self.normalize = (float(norm["normalizer.mean"].reshape(-1)[0]),
                              float(norm["normalizer.var"].reshape(-1)[0]) ** 0.5)
        self.tok = prepare_tokenizer(tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(d))

    def score(self, prompts, responses):
        import torch

        from .text import pad_pairs

        pairs = encode_pairs(self.tok, prompts, responses, template=self.template,
                             append_eos=True, max_length=self.max_length)
        out = np.zeros(len(pairs))
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for idx in length_batches([len(p) + len(r) for p, r in pairs], self.batch_size):
                ids, att, _, _ = pad_pairs([pairs[i] for i in idx], self.tok.pad_token_id, "right")
                s = self.model(ids.to(device), att.to(device)).reshape(len(idx))
                out[idx] = s.double().cpu().numpy()
        if self.normalize is not None:
            out = (out - self.normalize[0]) / self.normalize[1]
        return out


# ----------------------------------------------------------------------------- loading

def parse_spec(spec) -> tuple[str | None, object]:
    """Split a `kind:` prefix off a spec string.

    Returns
    -------
    (kind or None, rest)
    """
    if isinstance(spec, str):
        head, sep, rest = spec.partition(":")
        if sep and head.lower() in KINDS:
            return head.lower(), rest
    return None, spec


def _declared_kind(kind, where) -> str | None:
    if kind is None:
        return None
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}", file=str(where))
    return kind


def _local_dir(spec: str) -> Path | None:
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    if ":" in spec:  # module:function or file.py:function, never a hub id
        return None
    if spec.startswith((".", "/", "~")):
        raise InputError("unknown scorer: no such directory", file=spec)
    try:
        from huggingface_hub import snapshot_download

        d = Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                         "*.txt", "*.jinja", "tokenizer*"]))
        if not any(d.glob("*.safetensors")):
            # published as .bin only (the beaver-7b models): fetch the weights, never other
            # pickles such as training_args.bin; they are read through the restricted unpickler
            d = Path(snapshot_download(spec, allow_patterns=["pytorch_model*.bin"]))
        return d
    except Exception as e:  # bad id, offline, gated: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"unknown scorer: not a directory, a module:function, or a reachable "
                         f"Hugging Face model ({first})", file=spec) from None


def load_scorer(spec, *, batch_size: int = 8, template: str | None = None, dtype=None,
                device: str | None = None, trust_remote_code: bool = False) -> Scorer:
    """Load a scorer from a spec.

    Parameters
    ----------
    spec : str or callable
        Optionally prefixed by `reward:`, `safety:` or `cost:` (the declared kind, which wins
        over the model's own config). Then: a directory (or HF id) holding
        `dualign_scorer.json` (trained head), a `LlamaForScore` config (safe-rlhf), or a
        sequence-classification model; or `module:function` / `file.py:function`; or a
        callable. Security: a `file.py:function` spec imports and runs that file's code, as
        `python file.py` would; only use files you trust.
    batch_size : int
        Pairs per forward pass.
    template : str, optional
        Prompt template (`{prompt}`, optionally `{response}`); default: the chat template,
        or the PKU template for safe-rlhf models.
    dtype, device : as in `load_policy`
    trust_remote_code : bool
        Only for sequence-classification models that need it; never for safe-rlhf ones.

    Returns
    -------
    Scorer

    Raises
    ------
    InputError
        Unknown or unloadable spec, a classifier with more than one output, a function that
        cannot be imported (each one line).
    """
    kind, rest = parse_spec(spec)
    if callable(rest):
        return CallableScorer(rest, kind=kind, batch_size=batch_size)
    rest = str(rest)
    d = _local_dir(rest)
    if d is None:
        return CallableScorer(_import_callable(rest), name=rest, kind=kind, batch_size=batch_size)
    if (d / HEAD_SCORER_FILE).exists():
        from .head_scorer import HeadScorer  # lazy: trained heads are optional

        head = HeadScorer.load(d)
        declared = getattr(head, "kind", None)
        if declared is None:
            declared = json.loads((d / HEAD_SCORER_FILE).read_text()).get("kind")
        return CallableScorer(head, name=rest, kind=kind or _declared_kind(declared, d / HEAD_SCORER_FILE),
                              batch_size=None)
    if not (d / "config.json").exists():
        raise InputError(f"unknown scorer: the directory has neither {HEAD_SCORER_FILE} nor config.json", file=rest)
    cfg = json.loads((d / "config.json").read_text())
    if any(a.endswith("ForScore") for a in cfg.get("architectures") or []):
        return SafeRLHFScorer(d, name=rest, template=template or PKU_TEMPLATE, batch_size=batch_size,
                              dtype=dtype, device=device, kind=kind)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .loading import resolve_device, resolve_dtype

    device = resolve_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            d, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load as a sequence-classification score model ({first})", file=rest) from None
    return SequenceClassifierScorer(model.to(device), tok, name=rest, template=template,
                                    batch_size=batch_size, kind=kind)


def parse_named(spec: str) -> tuple[str, str]:
    """`NAME=SPEC` -> (NAME, SPEC); a bare SPEC is named after its last path component.

    Raises
    ------
    InputError
        An empty name or spec.
    """
    name, sep, rest = spec.partition("=")
    if not sep:
        _, bare = parse_spec(spec)
        rest, name = spec, Path(str(bare).rstrip("/")).name.split(":")[-1]
    if not name or not rest:
        raise InputError(f"expected NAME=SPEC, got '{spec}'", field="--safety")
    return name, rest



def peek_kind(spec) -> str | None:
    """The kind a spec declares, found cheaply (prefix, `dualign_scorer.json`, a safe-rlhf
    `score_type`, a callable's `kind`) without loading any model, so that a missing sign is
    reported before hours of scoring. None when nothing declares it."""
    kind, rest = parse_spec(spec)
    if kind is not None:
        return kind
    if callable(rest):
        return getattr(rest, "kind", None)
    p = Path(str(rest)).expanduser()
    if p.is_dir():
        if (p / HEAD_SCORER_FILE).exists():
            return json.loads((p / HEAD_SCORER_FILE).read_text()).get("kind")
        if (p / "config.json").exists():
            t = json.loads((p / "config.json").read_text()).get("score_type")
            return t if t in ("reward", "cost") else None
        return None
    if ":" in str(rest):
        return getattr(_import_callable(str(rest)), "kind", None)
    return None


def check_safety_sign(spec, name: str) -> None:
    """Raise the documented one-line error when a safety spec declares no usable sign.

    Raises
    ------
    InputError
        "cost model without a sign" (nothing declares the kind), or a reward model used
        as a constraint without a prefix.
    """
    kind = peek_kind(spec)
    if kind is None:
        raise InputError(f"cost model without a sign: write --safety {name}=cost:SPEC (scores "
                         f"are negated) or {name}=safety:SPEC (used as is)", field=f"safety/{name}")
    if kind == "reward":
        raise InputError(f"'{spec}' declares itself a reward model; write {name}=safety:SPEC or "
                         f"{name}=cost:SPEC to use it as a constraint", field=f"safety/{name}")
