"""The math of CAN's dual (docs/design.md §2): numpy/scipy only, importable without torch."""
from ..errors import DualNotConvergedError, InfeasibleMarginError
from .bootstrap import BootstrapResult, bootstrap_dual
from .margins import lambda_for_margins, margin_for_lambda
from .problem import DualProblem, Prediction, validate_scores
from .sample_bias import MAX_TRUSTED_SHIFT, SampleBias, sample_bias, trusted_correction
from .solver import DualResult, score_unit, solve_dual, solve_problem
from .unsafe_rate import (check_unsafe_rate, is_unsafe, margin_for_unsafe_rate, min_unsafe_rate,
                          solve_max_unsafe_rate, unsafe_indicator, unsafe_rate, unsafe_rate_constraints)

__all__ = ["DualProblem", "Prediction", "SampleBias", "sample_bias", "MAX_TRUSTED_SHIFT", "trusted_correction",
           "DualResult", "BootstrapResult",
           "InfeasibleMarginError",
           "DualNotConvergedError", "score_unit",
           "solve_dual", "solve_problem", "bootstrap_dual", "lambda_for_margins",
           "margin_for_lambda", "validate_scores", "is_unsafe", "unsafe_indicator", "unsafe_rate",
           "min_unsafe_rate", "check_unsafe_rate", "margin_for_unsafe_rate", "unsafe_rate_constraints",
           "solve_max_unsafe_rate"]
