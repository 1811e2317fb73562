"""Dataset runners: resumable evaluation over many images."""

from convlens.runners.evaluate import EvaluationConfig, EvaluationResult, run_evaluation
from convlens.runners.store import ResultsStore

__all__ = ["EvaluationConfig", "EvaluationResult", "ResultsStore", "run_evaluation"]
