"""`resolve_device`: the one reading of a device setting, shared by training and serving."""

from __future__ import annotations

import torch


def resolve_device(spec: str | None) -> torch.device:
    """None or `auto` is CUDA when present, else CPU; an explicit CUDA request without one fails."""
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available")
    return dev
