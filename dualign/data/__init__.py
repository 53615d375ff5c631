"""Datasets: preference files (PKU-SafeRLHF, TRL, HH-RLHF) and the built-in demo data."""
from .demo_data import demo_dir, demo_path, demo_preferences, demo_prompts, refusal_check
from .preferences import load_preferences

__all__ = ["load_preferences", "demo_dir", "demo_path", "demo_preferences", "demo_prompts",
           "refusal_check"]
