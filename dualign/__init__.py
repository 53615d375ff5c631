"""dualign: one-shot safety alignment of language models via optimal dualization (CAN)."""
from .dual import (DualProblem, DualResult, bootstrap_dual, is_unsafe, lambda_for_margins, margin_for_lambda,
                   margin_for_unsafe_rate, solve_dual, solve_max_unsafe_rate, unsafe_indicator, unsafe_rate)
from .errors import DualignError, DualNotConvergedError, InfeasibleMarginError, InputError, OutputError

__version__ = "0.1.0"

__all__ = ["DualProblem", "DualResult", "DualignError", "DualNotConvergedError", "InfeasibleMarginError",
           "InputError", "OutputError",
           "bootstrap_dual", "lambda_for_margins", "margin_for_lambda", "solve_dual", "is_unsafe",
           "unsafe_indicator", "unsafe_rate", "margin_for_unsafe_rate", "solve_max_unsafe_rate", "__version__"]
