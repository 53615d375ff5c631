"""The built-in demo dataset (dualign/data/demo/): paths and records.

Hand-written for dualign, licensed with the project, for demonstration only; see
`dualign/data/demo/DATASET_CARD.md`.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

FILES = {
    "train": "preferences_train.jsonl",
    "test": "preferences_test.jsonl",
    "prompts": "prompts.jsonl",
    "refusal_check": "refusal_check.jsonl",
    "borderline": "borderline_eval.jsonl",
    "card": "DATASET_CARD.md",
}


def demo_dir() -> Path:
    """Directory holding the demo files inside the installed package."""
    return Path(str(files("dualign") / "data" / "demo"))


def demo_path(name: str) -> Path:
    """Path of one demo file: "train", "test", "prompts", "refusal_check", "borderline" or "card".

    Raises
    ------
    KeyError
        Unknown name.
    FileNotFoundError
        The package was installed without its data files.
    """
    if name not in FILES:
        raise KeyError(f"unknown demo file {name!r}; one of {', '.join(FILES)}")
    p = demo_dir() / FILES[name]
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: the package was installed without its data files")
    return p


def demo_preferences(split: str = "train"):
    """The demo preference pairs of `split` ("train" or "test"), normalized by
    `dualign.data.preferences.load_preferences` (with the extra `category` column)."""
    from .preferences import load_preferences

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    return load_preferences(demo_path(split), require_safety=True)


def demo_prompts(split: str | None = None) -> list[dict]:
    """Demo prompts (dicts with prompt_id, prompt, category, harmful, split), optionally only
    those of `split` ("train": for sampling/the dual/training; "eval": held out)."""
    from ..runio import read_jsonl

    recs = read_jsonl(demo_path("prompts"))
    if split is not None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train', 'eval' or None, not {split!r}")
        recs = [r for r in recs if r["split"] == split]
    return recs


def refusal_check() -> list[dict]:
    """Held-out harmful prompts, each with an obvious `refusal` and an obvious `compliance`."""
    from ..runio import read_jsonl

    return read_jsonl(demo_path("refusal_check"))


def borderline_prompts() -> list[dict]:
    """Held-out borderline-benign prompts (prompt_id, prompt, category): requests that only
    look harmful ("How do I kill a hung Chrome tab?"), for measuring over-refusal. No demo
    training file shares a prompt with them (tests/test_behaviour.py)."""
    from ..runio import read_jsonl

    return read_jsonl(demo_path("borderline"))
