"""Kernels of parameter-free branches: identity and average pooling."""
from __future__ import annotations

import torch
from torch import Tensor


def _channel_diagonal(
    channels: int, in_per_group: int, size: tuple[int, int], dtype, device
) -> tuple[Tensor, Tensor, Tensor]:
    """Index helper: zeros of shape (channels, in_per_group, kh, kw) and, for every output
    channel c, the input slot ``c mod in_per_group`` it sees in its own group."""
    kernel = torch.zeros(channels, in_per_group, *size, dtype=dtype, device=device)
    return kernel, torch.arange(channels, device=device), torch.arange(channels, device=device) % in_per_group


def identity_kernel(
    channels: int,
    groups: int,
    size: tuple[int, int],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The conv kernel of ``y = x``: 1 at the centre tap of entry ``(c, c mod (C / groups))``
    (``dtype=None``: the default dtype, as for torch's factory functions)."""
    kernel, out_idx, in_idx = _channel_diagonal(channels, channels // groups, size, dtype, device)
    kernel[out_idx, in_idx, size[0] // 2, size[1] // 2] = 1
    return kernel


def average_kernel(
    channels: int,
    groups: int,
    size: tuple[int, int],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The conv kernel of a ``kh x kw`` average pool with ``count_include_pad=True``:
    ``1 / (kh kw)`` on every tap of entry ``(c, c mod (C / groups))``."""
    kernel, out_idx, in_idx = _channel_diagonal(channels, channels // groups, size, dtype, device)
    kernel[out_idx, in_idx] = 1.0 / (size[0] * size[1])
    return kernel
