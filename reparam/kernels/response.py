"""The conv kernel of any block that is affine in its input, read off its impulse responses."""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from reparam.errors import ConfigError


class ConvGeometry(Protocol):
    """What the response needs to know of the conv: ``reparam.blocks.ConvGeometry`` or an
    ``nn.Conv2d`` with integer-pair padding."""

    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def _conv_kwargs(g: ConvGeometry) -> dict:
    return dict(stride=g.stride, padding=g.padding, dilation=g.dilation, groups=g.groups)


def _canvas(geometry: ConvGeometry) -> tuple[tuple[int, int], tuple[int, int]]:
    """Input size and impulse position so that every tap of an interior output sees the impulse
    and no output that does touches the border: ``q = (k - 1) d + s``, size ``2 q + 1``."""
    q = tuple((k - 1) * d + s for k, d, s in zip(geometry.kernel_size, geometry.dilation, geometry.stride))
    return (2 * q[0] + 1, 2 * q[1] + 1), q  # type: ignore[return-value]


def conv_response(
    fn: Callable[[Tensor], Tensor], geometry: ConvGeometry, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` of the conv ``fn`` computes, assuming ``fn`` is affine in its input:
    ``W[o, i, t] = fn(e_{i,q})[o, p] - fn(0)[o, p]`` where ``p s = q + pad - t d``.

    Forward passes only (so it is differentiable in whatever ``fn`` closes over): one batch of
    ``in_channels`` impulses per stride phase (``s_h * s_w`` batches). Returns the dense
    ``(out, in / groups, kh, kw)`` kernel; entries of ``fn``'s response outside its groups must
    be zero (:func:`check_conv` confirms the whole function). ``bias`` is the zero-input response
    at the impulse's output position.
    """
    g = geometry
    (height, width), (qh, qw) = _canvas(g)
    kh, kw = g.kernel_size
    (sh, sw), (dh, dw), (ph, pw) = g.stride, g.dilation, g.padding
    zero = torch.zeros(1, g.in_channels, height, width, dtype=dtype, device=device)
    base = fn(zero)
    rows: list[list[Tensor | None]] = [[None] * kw for _ in range(kh)]
    bias = None
    for ah in range(sh):
        for aw in range(sw):
            taps = [(th, tw) for th in range(kh) for tw in range(kw)
                    if (qh + ah + ph - th * dh) % sh == 0 and (qw + aw + pw - tw * dw) % sw == 0]
            if not taps:
                continue
            impulses = torch.zeros(g.in_channels, g.in_channels, height, width, dtype=dtype, device=device)
            idx = torch.arange(g.in_channels, device=device)
            impulses[idx, idx, qh + ah, qw + aw] = 1
            response = fn(impulses) - base  # (in, out, H', W')
            for th, tw in taps:
                oh, ow = (qh + ah + ph - th * dh) // sh, (qw + aw + pw - tw * dw) // sw
                rows[th][tw] = response[:, :, oh, ow].T  # (out, in)
                if bias is None:
                    bias = base[0, :, oh, ow]
    dense = torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)  # type: ignore[arg-type]
    return _grouped(dense, g.groups), bias  # type: ignore[return-value]


def _grouped(dense: Tensor, groups: int) -> Tensor:
    """The ``(out, in / groups, kh, kw)`` slice of a dense ``(out, in, kh, kw)`` kernel that a
    grouped conv keeps: output channel ``o`` sees the inputs of its own group."""
    if groups == 1:
        return dense
    out, cin = dense.shape[:2]
    per_out, per_in = out // groups, cin // groups
    blocks = dense.reshape(groups, per_out, groups, per_in, *dense.shape[2:])
    return torch.diagonal(blocks, dim1=0, dim2=2).movedim(-1, 0).reshape(out, per_in, *dense.shape[2:])


def check_conv(
    fn: Callable[[Tensor], Tensor], geometry: ConvGeometry, weight: Tensor, bias: Tensor, seed: int = 0
) -> float:
    """Relative ``max |fn(x) - conv(x; W, b)| / max |fn(x)|`` on a random ``(1, in, n, n)`` input
    (``n``: the impulse canvas, so borders and interior both occur): 0 up to rounding when ``fn``
    is the conv ``(W, b)``.
    Raises :class:`ConfigError` when the shapes differ (``fn`` is not a conv of ``geometry``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    (height, width), _ = _canvas(geometry)
    x = torch.randn(1, geometry.in_channels, height, width, generator=gen, dtype=weight.dtype).to(weight.device)
    y = fn(x)
    ref = F.conv2d(x, weight, bias, **_conv_kwargs(geometry))
    if y.shape != ref.shape:
        raise ConfigError(
            f"the block maps {tuple(x.shape)} to {tuple(y.shape)}, not to {tuple(ref.shape)} as a conv with "
            f"{geometry} would: give the block's conv geometry explicitly"
        )
    scale = float(y.abs().max()) or 1.0
    return float((y - ref).abs().max()) / scale
