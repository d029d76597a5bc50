"""Small helpers shared by the PowerGrad Transform modules."""
from __future__ import annotations

import contextlib
import math
from typing import ContextManager

import torch


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float after checking ``0 <= alpha <= 1``.

    Raises ``ValueError`` naming the argument for anything else (NaN, inf, bools,
    tensors with more than one element, values outside the closed unit interval).
    """
    if isinstance(alpha, bool):
        raise ValueError(f"alpha must be a real number in [0, 1], got the bool {alpha!r}")
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a scalar in [0, 1], got a tensor of shape {tuple(alpha.shape)}")
        alpha = alpha.item()
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a real number in [0, 1], got {alpha!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"alpha must lie in [0, 1] (alpha=1 is the ordinary gradient, alpha=0 the uniform "
            f"distribution), got alpha={alpha!r}"
        )
    return value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype PGT math runs in: float32 for half/bfloat16 inputs, else the input's own."""
    return torch.promote_types(dtype, torch.float32)


def autocast_disabled(device_type: str) -> ContextManager[object]:
    """A context that switches autocast off for ``device_type`` (no-op where autocast
    does not exist for that device)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):  # pragma: no cover - exotic backends
        return contextlib.nullcontext()
