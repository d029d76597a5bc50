"""Small helpers shared by the PowerGrad Transform modules."""
from __future__ import annotations

import contextlib
import math
import numbers
from contextlib import AbstractContextManager as ContextManager
from typing import Union

import torch
from torch import Tensor

AlphaLike = Union[float, int, Tensor]


def check_alpha(alpha: AlphaLike) -> float:
    """Return ``alpha`` as a float after checking that it is a real number in ``[0, 1]``.

    Accepted: Python/NumPy real numbers and one-element tensors that do not require grad.
    Raises ``ValueError`` naming the argument for anything else: bools, strings and other
    non-real types, NaN/inf, values outside the closed unit interval, tensors with more than
    one element, and tensors that require grad (PGT treats alpha as a fixed hyperparameter
    and would silently give it no gradient).
    """
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a scalar in [0, 1], got a tensor of shape {tuple(alpha.shape)}")
        if alpha.requires_grad:
            raise ValueError(
                "alpha is a tensor that requires grad, but PGT treats alpha as a fixed hyperparameter "
                "and gives it no gradient; pass alpha.item() (or alpha.detach())"
            )
        alpha = alpha.item()  # bool / complex tensors give a bool / complex: rejected below
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"alpha must be a real number in [0, 1], got {type(alpha).__name__} {alpha!r}")
    value = float(alpha)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"alpha must lie in [0, 1] (alpha=1 is the ordinary gradient, alpha=0 the uniform "
            f"distribution), got alpha={alpha!r}"
        )
    return value


def scaled_softmax(z: Tensor, alpha: float, dim: int = -1) -> Tensor:
    r"""``softmax(alpha * z)`` along ``dim`` (= ``p**alpha / sum p**alpha`` for ``p = softmax(z)``).

    At ``alpha = 0`` it returns the limit ``alpha -> 0+``: the uniform distribution over the
    entries with ``z > -inf``, zero on masked (``-inf``) entries, instead of ``0 * -inf = NaN``.
    Differentiable in ``z`` (at ``alpha = 0`` the derivative is 0, the limit of ``alpha * J``).
    """
    if alpha == 0.0:
        z = torch.where(z == -math.inf, z, torch.zeros_like(z))
    else:
        z = z * alpha
    return torch.softmax(z, dim=dim)


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
