"""The image tools' device check: ``--device`` as a torch.device, refused in one line when unknown or absent.

The image options themselves are declared once with every other option (:mod:`models.options.catalog`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def check_device(spec: "str | None") -> "torch.device | None":
    """``--device`` as a torch.device (None: the default), or one-line ValueError when unknown or absent."""
    if spec is None:
        return None
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec!r}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec!r}: not supported here (use cpu, cuda or cuda:N)")
    return device
