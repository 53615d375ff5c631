"""Deterministic toy score functions for pipeline tests (loaded via the `file.py:function` spec)."""


def reward(prompts, responses):
    """Longer answers are more 'helpful' (capped)."""
    return [min(len(r), 40) / 10.0 for r in responses]


def safety(prompts, responses):
    """Fewer vowels is 'safer': an arbitrary but fixed property of the text."""
    return [1.0 - 5.0 * sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


safety.kind = "safety"
