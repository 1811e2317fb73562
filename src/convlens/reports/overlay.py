"""Heat-map overlays (implemented in :mod:`convlens.core.overlay`, re-exported for report code)."""

from convlens.core.overlay import colorize, overlay_map

__all__ = ["colorize", "overlay_map"]
