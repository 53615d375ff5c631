"""dualign: one-shot safety alignment of language models via optimal dualization (CAN)."""
from .errors import DualignError, InfeasibleMarginError, InputError

__version__ = "0.1.0"

__all__ = ["DualignError", "InfeasibleMarginError", "InputError", "__version__"]
