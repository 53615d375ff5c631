"""The math of CAN's dual (DESIGN.md §2): numpy/scipy only, importable without torch."""
from ..errors import InfeasibleMarginError
from .bootstrap import BootstrapResult, bootstrap_dual
from .margins import lambda_for_margins, margin_for_lambda
from .problem import DualProblem, Prediction, validate_scores
from .solver import DualResult, solve_dual, solve_problem

__all__ = ["DualProblem", "Prediction", "DualResult", "BootstrapResult", "InfeasibleMarginError",
           "solve_dual", "solve_problem", "bootstrap_dual", "lambda_for_margins",
           "margin_for_lambda", "validate_scores"]
