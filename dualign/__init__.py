"""dualign: one-shot safety alignment of language models via optimal dualization (CAN)."""
from .dual import (DualProblem, DualResult, bootstrap_dual, lambda_for_margins, margin_for_lambda,
                   solve_dual)
from .errors import DualignError, InfeasibleMarginError, InputError

__version__ = "0.1.0"

__all__ = ["DualProblem", "DualResult", "DualignError", "InfeasibleMarginError", "InputError",
           "bootstrap_dual", "lambda_for_margins", "margin_for_lambda", "solve_dual", "__version__"]
