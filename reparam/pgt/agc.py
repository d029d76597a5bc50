r"""Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, the paper's baseline).

For every output unit ``i`` of a parameter ``W`` (row ``W[i]`` of a linear weight, filter
``W[i]`` of a conv weight; the whole tensor for biases and other vectors/scalars):

.. math::  G_i \leftarrow G_i \cdot \min\Big(1, \frac{\lambda \max(\lVert W_i\rVert_F, \epsilon)}{\lVert G_i\rVert_F}\Big)

so that afterwards ``||G_i|| <= lambda * max(||W_i||, eps)``.  Under AMP unscale the gradients
first (``scaler.unscale_(optimizer)``).  Brock et al. leave the final classifier unclipped:
pass only the parameters you want clipped.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from ._common import compute_dtype

__all__ = ["adaptive_grad_clip_", "unitwise_norm"]


def unitwise_norm(x: Tensor) -> Tensor:
    """Frobenius norm per output unit: over all dims but the first for ``x.dim() >= 2``
    (kept as size-1 dims for broadcasting), over the whole tensor otherwise."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


@torch.no_grad()
def adaptive_grad_clip_(
    parameters: Tensor | Iterable[Tensor],
    clip_factor: float = 0.01,
    eps: float = 1e-3,
) -> None:
    """Clip ``.grad`` of ``parameters`` in place, unit-wise, to
    ``||G_i|| <= clip_factor * max(||W_i||, eps)``.  Parameters without a gradient are skipped.

    Norms and factors are computed in at least float32 (float64 parameters in float64).

    Raises ``ValueError`` for a non-positive or non-finite ``clip_factor`` or a negative ``eps``.
    """
    if not (isinstance(clip_factor, (int, float)) and math.isfinite(clip_factor) and clip_factor > 0):
        raise ValueError(f"clip_factor must be a finite positive number, got {clip_factor!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise ValueError("adaptive_grad_clip_ does not support sparse gradients")
        norm_dtype = compute_dtype(grad.dtype)  # at least float32; float64 stays float64
        w_norm = unitwise_norm(param.detach().to(norm_dtype)).clamp_min(eps)
        g_norm = unitwise_norm(grad.to(norm_dtype))
        max_norm = clip_factor * w_norm
        # factor = max_norm / g_norm where the unit is too large, 1 elsewhere (0/0 safe)
        factor = torch.where(
            g_norm > max_norm, max_norm / g_norm.clamp_min(torch.finfo(g_norm.dtype).tiny), torch.ones_like(g_norm)
        )
        grad.mul_(factor.to(grad.dtype))
