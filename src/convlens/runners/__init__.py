"""Runners: many images at once, resumable — ``convlens explain`` (:mod:`convlens.runners.explain`) and
``convlens evaluate`` (:mod:`convlens.runners.evaluate`) as library calls."""

from convlens.runners.evaluate import EvaluationConfig, EvaluationResult, run_evaluation
from convlens.runners.explain import ExplainConfig, ExplainError, ExplainResult, run_explain
from convlens.runners.store import ResultsStore

__all__ = [
    "EvaluationConfig",
    "EvaluationResult",
    "ExplainConfig",
    "ExplainError",
    "ExplainResult",
    "ResultsStore",
    "run_evaluation",
    "run_explain",
]
