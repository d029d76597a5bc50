"""Conv followed by an eval-mode BatchNorm is one conv."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from reparam.errors import ConfigError


def batchnorm_affine(bn: nn.BatchNorm2d, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` of an eval-mode BatchNorm: ``bn(x) = scale * x + shift``.

    ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``
    (``gamma = 1``, ``beta = 0`` when the BN has no affine parameters).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError(
            f"{type(bn).__name__} has track_running_stats=False: an eval-mode fusion needs running statistics"
        )
    dtype = dtype or bn.running_mean.dtype
    mean = bn.running_mean.to(dtype)
    var = bn.running_var.to(dtype)
    gamma = bn.weight.to(dtype) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.to(dtype) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def fold_batchnorm(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it.

    ``W' = W * gamma / sigma`` per output channel and
    ``b' = beta + (b - mu) * gamma / sigma`` with ``sigma = sqrt(var + eps)``;
    a missing conv bias counts as zero (it is never dropped).
    """
    scale, shift = batchnorm_affine(bn, weight.dtype)
    folded_bias = shift if bias is None else shift + bias * scale
    return weight * scale.reshape(-1, 1, 1, 1), folded_bias
