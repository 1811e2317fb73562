"""Explanation methods (one file each) and their registry."""

from convlens.methods.base import Explainer, GradientCAM
from convlens.methods.registry import METHODS, available_methods, create, get_method

__all__ = ["METHODS", "Explainer", "GradientCAM", "available_methods", "create", "get_method"]
