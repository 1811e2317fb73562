"""Which device a run uses: a user's ``--device`` text checked against this machine."""

from __future__ import annotations

import torch

__all__ = ["DeviceError", "check_device"]


class DeviceError(ValueError):
    """A device name that is not a device, or not one this machine has (the message says which)."""


def check_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` when this machine has that GPU; anything else is a clear error
    (``convlens evaluate`` and ``convlens explain`` alike)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"--device {name!r} is not a device: use cpu or cuda (cuda:N for the N-th GPU)") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"--device {name!r}: convlens runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA device is available on this machine (use --device cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
