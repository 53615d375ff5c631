"""The prompts a run samples: a file's prompts, optionally one split of them (the built-in
prompts carry train/eval splits), as the pipelines' settings name them."""
from __future__ import annotations

from pathlib import Path


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


def config_prompts(cfg, evaluation: bool = False) -> list[str]:
    """The prompts a pipeline's settings name (`PipelineConfig` fields): `prompts`, its
    `prompt_split`, at most `max_prompts` (0: all); with `evaluation`, the held-out ones:
    `eval_prompts` (else `prompts`), `eval_split`, `max_eval_prompts`. Raises as `prompts_of`."""
    if evaluation:
        return prompts_of(cfg.eval_prompts or cfg.prompts, cfg.prompt_column, cfg.eval_split,
                          cfg.max_eval_prompts or None)
    return prompts_of(cfg.prompts, cfg.prompt_column, cfg.prompt_split, cfg.max_prompts or None)
