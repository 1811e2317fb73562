"""Explanation methods: one module per method (SISE and ADVISE each with one helper module), base classes, registry."""

from convlens.methods.base import Explainer, GradientCAM
from convlens.methods.registry import METHODS, available_methods, create, get_method

__all__ = ["METHODS", "Explainer", "GradientCAM", "available_methods", "create", "get_method"]
