"""A score model that is a linear head on a frozen backbone's pooled features.

On disk it is a directory:

    dualign_scorer.json   {"format": "dualign-head-scorer", "version": 1, "kind": "reward"|"cost",
                           "backbone": spec, "pooling": "last"|"mean", "template": str|null,
                           "max_length": int|null, "feature_dim": d, "training": {...},
                           "metrics": {...}}
    head.safetensors      weight (d,), bias (1,), feature_mean (d,), feature_std (d,)  float32

The score is `weight · (features - feature_mean) / feature_std + bias`. A cost model returns
cost (higher = less safe); `kind` says which, and `dualign.models.scorers.load_scorer`
negates cost into safety.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError

FORMAT = "dualign-head-scorer"
VERSION = 1
CONFIG_FILE = "dualign_scorer.json"
WEIGHTS_FILE = "head.safetensors"
HEAD_KINDS = ("reward", "cost")
_RECENT: dict = {}  # features key -> features of the latest HeadScorer.features call


class HeadScorer:
    """Linear head on frozen pooled features of a backbone.

    Parameters
    ----------
    kind : {"reward", "cost"}
    backbone : str
        Backbone spec for `dualign.models.features.load_backbone`.
    weight : numpy.ndarray, shape (d,)
    bias : float
    feature_mean, feature_std : numpy.ndarray, shape (d,)
        Standardization applied before the head (std > 0).
    pooling : {"last", "mean"}
    template : str, optional
        Prompt template used when the features were computed (None: the chat template).
    max_length : int, optional
    meta : dict, optional
        Training settings and held-out metrics, saved in the config.

    Attributes
    ----------
    kind, backbone, pooling, template, max_length, weight, bias, feature_mean, feature_std, meta
    """

    def __init__(self, kind: str, backbone: str, weight, bias: float, feature_mean, feature_std, *,
                 pooling: str = "last", template: str | None = None, max_length: int | None = 512,
                 meta: dict | None = None, batch_size: int = 16):
        if kind not in HEAD_KINDS:
            raise ValueError(f"kind must be one of {HEAD_KINDS}, not {kind!r}")
        self.kind, self.backbone, self.pooling = kind, str(backbone), pooling
        self.template, self.max_length = template, max_length
        self.weight = np.asarray(weight, dtype=np.float32).reshape(-1)
        self.bias = float(bias)
        self.feature_mean = np.asarray(feature_mean, dtype=np.float32).reshape(-1)
        self.feature_std = np.asarray(feature_std, dtype=np.float32).reshape(-1)
        if not (self.weight.shape == self.feature_mean.shape == self.feature_std.shape):
            raise ValueError("weight, feature_mean and feature_std must have the same shape (d,)")
        self.meta = dict(meta or {})
        self.batch_size = batch_size
        self._loaded = None  # (model, tokenizer), loaded on first call

    # ------------------------------------------------------------------ scoring
    def score_features(self, features) -> np.ndarray:
        """Head output for precomputed features.

        Parameters
        ----------
        features : numpy.ndarray, shape (n, d)

        Returns
        -------
        numpy.ndarray, shape (n,), float64
        """
        x = (np.asarray(features, dtype=np.float64) - self.feature_mean) / self.feature_std
        return x @ self.weight.astype(np.float64) + self.bias

    def features(self, prompts: Sequence[str], responses: Sequence[str], progress: bool = True) -> np.ndarray:
        """Backbone features of the pairs, shape (n, d), computed as at training time.

        Through the on-disk feature cache (`cached_features`): pairs the head was trained on,
        or that were scored before, are not run through the backbone again (a pipeline that
        relabels the scorer's own training pairs, as the demo does, scores them for free). The
        features of the latest call are also kept in memory, so a reward and a cost head on the
        same backbone and settings scoring the same pairs one after the other run it once."""
        from .features import cached_features, features_key

        key = features_key(self.backbone, self.pooling, self.template, self.max_length, prompts, responses)
        if key in _RECENT:
            return _RECENT[key]
        x, loaded = cached_features(self.backbone, list(prompts), list(responses), pooling=self.pooling,
                                    template=self.template, max_length=self.max_length, loaded=self._loaded,
                                    batch_size=self.batch_size, progress=progress, desc=f"{self.kind} features")
        self._loaded = loaded if loaded is not None else self._loaded
        if x.shape[1] != self.weight.shape[0]:
            raise InputError(f"backbone '{self.backbone}' gives {x.shape[1]} features but the head "
                             f"expects {self.weight.shape[0]}")
        x.setflags(write=False)  # shared with the next head: nobody may change it in place
        _RECENT.clear()  # one entry: enough for back-to-back heads, and bounded memory
        _RECENT[key] = x
        return x

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Raw head output per pair: reward, or cost for a cost model (higher = less safe).

        Returns
        -------
        numpy.ndarray, shape (n,), float64

        Raises
        ------
        ValueError
            `prompts` and `responses` differ in length.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if len(prompts) == 0:
            return np.zeros(0)
        return self.score_features(self.features(prompts, responses))

    def use_backbone(self, model, tokenizer) -> "HeadScorer":
        """Reuse an already loaded backbone (e.g. shared by a reward and a cost head)."""
        self._loaded = (model, tokenizer)
        return self

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "kind": self.kind, "backbone": self.backbone,
                "pooling": self.pooling, "template": self.template, "max_length": self.max_length,
                "feature_dim": int(self.weight.shape[0]), "standardized": True, **self.meta}

    def save(self, directory) -> Path:
        """Write the scorer directory atomically (each file is renamed into place; the config,
        which marks the directory as a scorer, is written last).

        Returns
        -------
        pathlib.Path : the directory.
        """
        from safetensors.numpy import save_file

        from ..runio import atomic_path, write_json

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight, "bias": np.array([self.bias], dtype=np.float32),
                   "feature_mean": self.feature_mean, "feature_std": self.feature_std}
        with atomic_path(d / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "kind": self.kind})
        write_json(self.config(), d / CONFIG_FILE)
        return d

    @classmethod
    def load(cls, directory) -> "HeadScorer":
        """Load a scorer directory written by `save`.

        Raises
        ------
        InputError
            Missing files, another format, an unsupported version, an unknown kind, or
            weights whose shapes disagree (naming the file and field).
        """
        from safetensors.numpy import load_file

        d = Path(directory)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        if not cfg_path.exists():
            raise InputError("not a dualign head scorer (no config)", file=str(cfg_path))
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON ({e.msg})", file=str(cfg_path)) from None
        if cfg.get("format") != FORMAT:
            raise InputError(f"expected format '{FORMAT}'", file=str(cfg_path), field="format")
        if cfg.get("version") != VERSION:
            raise InputError(f"unsupported version {cfg.get('version')!r} (this dualign reads {VERSION})",
                             file=str(cfg_path), field="version")
        if cfg.get("kind") not in HEAD_KINDS:
            raise InputError(f"kind must be one of {HEAD_KINDS}", file=str(cfg_path), field="kind")
        if not w_path.exists():
            raise InputError("missing head weights", file=str(w_path))
        t = load_file(str(w_path))
        for k in ("weight", "bias", "feature_mean", "feature_std"):
            if k not in t:
                raise InputError("missing tensor", file=str(w_path), field=k)
        meta = {k: v for k, v in cfg.items() if k not in (
            "format", "version", "kind", "backbone", "pooling", "template", "max_length",
            "feature_dim", "standardized")}
        try:
            return cls(cfg["kind"], cfg["backbone"], t["weight"], float(t["bias"].reshape(-1)[0]),
                       t["feature_mean"], t["feature_std"], pooling=cfg.get("pooling", "last"),
                       template=cfg.get("template"), max_length=cfg.get("max_length"), meta=meta)
        except (ValueError, KeyError) as e:
            raise InputError(f"inconsistent scorer ({e})", file=str(d)) from None
