"""Shared numerics below methods and metrics: adaptive-bandwidth KDE, Otsu thresholds, MATLAB resizing, AVX maths."""
