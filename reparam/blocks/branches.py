"""The branch kinds a block is made of. Each branch knows how to run, how to become a
kernel (eval semantics, differentiable), and how it looks to the optimizer (mask,
spatial Jacobian, constant part)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reparam.blocks.geometry import ConvGeometry
from reparam.errors import ConversionError, NotMaskEquivalent
from reparam.kernels import average_kernel, centre_pad, fold_batchnorm, identity_kernel, merge_1x1_then_kxk, window_mask

#: ``nn.Conv2d``-style factory keyword arguments: ``{"device": ..., "dtype": ...}``
Factory = Mapping[str, Any]
NO_FACTORY: Factory = MappingProxyType({})


def _optional_bn(channels: int, enabled: bool, factory: Factory) -> nn.BatchNorm2d | None:
    return nn.BatchNorm2d(channels, **factory) if enabled else None


def _maybe_fold(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor | None]:
    return (weight, bias) if bn is None else fold_batchnorm(weight, bias, bn)


def _silence_bn(bn: nn.BatchNorm2d) -> None:
    """``gamma = beta = 0``: the BN outputs exactly 0 in train and eval mode; ``gamma`` gets a
    gradient at the first step, after which the weights before it train too."""
    bn.weight.zero_()
    bn.bias.zero_()


def _kaiming_weight(shape: tuple[int, ...], factory: Factory) -> nn.Parameter:
    weight = torch.empty(shape, **factory)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return nn.Parameter(weight)


def _align(x: Tensor, padding: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """Return the input and conv padding that realise ``padding`` (negative = crop)."""
    if min(padding) >= 0:
        return x, padding
    ph, pw = padding
    return F.pad(x, (pw, pw, ph, ph)), (0, 0)


def _first_stage(branch: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The 1x1 conv (and BN) that opens a DBB sequential branch, and the padding its second stage
    must use: with a BN, the ring carries the BN's response to zero (``beta - mu·gamma/sigma``),
    so the output is pre-padded and the second stage pads by 0."""
    g = branch.geometry
    y = F.conv2d(x, branch.first, None, 1, 0, 1, g.groups)
    if branch.first_bn is None:
        return y, g.padding
    return _pad_with_zero_response(branch.first_bn(y), y, branch.first_bn, g.padding), (0, 0)


def _pad_with_zero_response(y: Tensor, pre: Tensor, bn: nn.BatchNorm2d, padding: tuple[int, int]) -> Tensor:
    """Pad ``y = bn(pre)`` with what ``bn`` outputs for a zero input, ``beta - mu gamma / sigma``,
    so that a following KxK conv sees the same ring as if the 1x1 stage ran on a zero-padded input.

    In training ``mu`` and ``sigma = sqrt(var + eps)`` are the batch statistics of ``pre`` (the
    biased variance BatchNorm normalizes with). The ring is a function of ``pre`` like every other
    output of ``bn``, so it stays in the autograd graph: gradients reach the 1x1 weights through
    it, not only ``gamma`` and ``beta``. In eval the running statistics make it the constant that
    fusion folds into the bias.
    """
    ph, pw = padding
    if not (ph or pw):
        return y
    if bn.training or bn.running_mean is None:
        var, mean = torch.var_mean(pre, dim=(0, 2, 3), unbiased=False)
    else:
        var, mean = bn.running_var, bn.running_mean
    scale = bn.weight / torch.sqrt(var + bn.eps) if bn.weight is not None else 1 / torch.sqrt(var + bn.eps)
    value = -mean * scale + (bn.bias if bn.bias is not None else 0)
    n, c, h, w = y.shape
    out = value.to(y.dtype).reshape(1, c, 1, 1).expand(n, c, h + 2 * ph, w + 2 * pw).clone()
    out[:, :, ph : ph + h, pw : pw + w] = y
    return out


class Branch(nn.Module):
    """Interface of a branch. ``kernel`` is the branch as one conv kernel of the block's
    full size (eval-mode BN folded), ``masks`` its binary receptive fields for SGS."""

    label = "branch"

    def __init__(self, geometry: ConvGeometry) -> None:
        super().__init__()
        self.geometry = geometry

    def kernel(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def masks(self, approximate: bool = False) -> list[Tensor]:
        """Binary (kh, kw) masks of this branch's trainable kernels. A branch that is not a
        mask of the full kernel raises :class:`NotMaskEquivalent`, or, with
        ``approximate=True``, returns its receptive field (the SGS paper's mask-sum)."""
        raise NotImplementedError

    def spatial_jacobian(self) -> Tensor | None:
        """``A`` of shape ``(kh*kw, r)`` with ``vec(W[o, i]) = A theta[o, i]`` for every channel
        pair, or ``None`` for a branch without trainable kernel entries."""
        raise NotImplementedError

    def constant(self) -> Tensor | None:
        """The parameter-free part of the branch's kernel (None if there is none)."""
        return None

    def silence(self) -> None:
        """Make the branch output exactly 0 (train and eval mode) while every parameter keeps a
        gradient path, so that a block can start as the function of its main branch alone."""
        raise ConversionError(f"branch {self.label!r} ({type(self).__name__}) does not know how to output 0")

    def _not_mask(self, approximate: bool, why: str) -> list[Tensor]:
        if not approximate:
            raise NotMaskEquivalent(f"branch {self.label!r} is not a binary mask of the fused kernel: {why}")
        return [self._full_mask()]

    def _full_mask(self) -> Tensor:
        return window_mask(self.geometry.kernel_size, self.geometry.kernel_size)

    def _require_linear(self, bn: nn.Module | None) -> None:
        if bn is not None:
            raise NotMaskEquivalent(
                f"branch {self.label!r} has a BatchNorm inside: in training its batch statistics depend on the "
                "branch weights, so no constant preconditioner reproduces it"
            )


class ConvBranch(Branch):
    """A ``window`` conv (e.g. KxK, 1xK, Kx1, 1x1) centred in the block's kernel, optionally
    followed by its own BatchNorm. Its kernel is ``M ⊙ W`` for the binary window mask ``M``."""

    def __init__(
        self, geometry: ConvGeometry, window: tuple[int, int], bn: bool, label: str, factory: Factory = NO_FACTORY
    ) -> None:
        super().__init__(geometry)
        self.window = window
        self.label = label
        self.weight = _kaiming_weight((geometry.out_channels, geometry.in_channels // geometry.groups, *window), factory)
        self.bn = _optional_bn(geometry.out_channels, bn, factory)

    def forward(self, x: Tensor) -> Tensor:
        g = self.geometry
        x, padding = _align(x, g.branch_padding(self.window))
        y = F.conv2d(x, self.weight, None, g.stride, padding, g.dilation, g.groups)
        return y if self.bn is None else self.bn(y)

    def kernel(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
        weight, bias = _maybe_fold(self.weight.to(dtype or self.weight.dtype), None, self.bn)
        return centre_pad(weight, self.geometry.kernel_size), bias

    def masks(self, approximate: bool = False) -> list[Tensor]:
        return [window_mask(self.window, self.geometry.kernel_size)]

    @torch.no_grad()
    def silence(self) -> None:
        if self.bn is not None:
            _silence_bn(self.bn)
        else:
            self.weight.zero_()  # linear: a zero kernel still gets the full gradient

    def spatial_jacobian(self) -> Tensor:
        self._require_linear(self.bn)
        mask = self.masks()[0].flatten()
        return torch.eye(mask.numel(), dtype=torch.float64)[:, mask.bool()]


class IdentityBranch(Branch):
    """``y = x`` (optionally through its own BatchNorm). Needs in == out and stride 1.
    Without BN it is a constant kernel ``C`` with no trainable entries."""

    label = "identity"

    def __init__(self, geometry: ConvGeometry, bn: bool, factory: Factory = NO_FACTORY) -> None:
        super().__init__(geometry)
        self.bn = _optional_bn(geometry.out_channels, bn, factory)
        self.register_buffer(
            "identity",
            identity_kernel(geometry.out_channels, geometry.groups, geometry.kernel_size, **factory),
            persistent=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        ph, pw = self.geometry.branch_padding((1, 1))
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        return x if self.bn is None else self.bn(x)

    def kernel(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
        return _maybe_fold(self.identity.to(dtype or self.identity.dtype), None, self.bn)

    def masks(self, approximate: bool = False) -> list[Tensor]:
        return []

    def spatial_jacobian(self) -> Tensor | None:
        self._require_linear(self.bn)
        return None

    def constant(self) -> Tensor | None:
        return self.identity if self.bn is None else None

    @torch.no_grad()
    def silence(self) -> None:
        if self.bn is not None:
            _silence_bn(self.bn)
        # without BN the identity is the constant kernel C: the block compensates it in its main branch


class SequentialBranch(Branch):
    """1x1 conv (in -> in, groups) [-> BN, padded with its zero response] -> KxK conv [-> BN].
    The kernel is a product of two trainable tensors: not linear in the parameters."""

    label = "1x1-kxk"

    def __init__(self, geometry: ConvGeometry, bn: bool, factory: Factory = NO_FACTORY) -> None:
        super().__init__(geometry)
        mid = geometry.in_channels
        self.first = nn.Parameter(identity_kernel(mid, geometry.groups, (1, 1), **factory))
        self.first_bn = _optional_bn(mid, bn, factory)
        self.second = _kaiming_weight((geometry.out_channels, mid // geometry.groups, *geometry.kernel_size), factory)
        self.second_bn = _optional_bn(geometry.out_channels, bn, factory)

    def forward(self, x: Tensor) -> Tensor:
        g = self.geometry
        y, padding = _first_stage(self, x)
        y = F.conv2d(y, self.second, None, g.stride, padding, g.dilation, g.groups)
        return y if self.second_bn is None else self.second_bn(y)

    def kernel(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
        dtype = dtype or self.second.dtype
        first, first_bias = _maybe_fold(self.first.to(dtype), None, self.first_bn)
        weight, bias = merge_1x1_then_kxk(first, first_bias, self.second.to(dtype), None, self.geometry.groups)
        return _maybe_fold(weight, bias, self.second_bn)

    def masks(self, approximate: bool = False) -> list[Tensor]:
        return self._not_mask(
            approximate, "it is the product of two trainable kernels (1x1 then KxK), so its Jacobian changes every step"
        )

    @torch.no_grad()
    def silence(self) -> None:
        if self.second_bn is not None:
            _silence_bn(self.second_bn)
        else:
            self.second.zero_()  # the 1x1 stays the identity, so the KxK still gets a gradient

    def spatial_jacobian(self) -> Tensor:
        raise NotMaskEquivalent(
            f"branch {self.label!r} is the product of two trainable kernels: not linear in its parameters, "
            "so no constant preconditioner J J^T exists"
        )


class AverageBranch(Branch):
    """1x1 conv (in -> out, groups) [-> BN, padded with its zero response] -> KxK average
    pool (count_include_pad, with the block's stride and dilation) [-> BN]. Linear without BN:
    one weight per channel pair spread uniformly, ``A = 1 / (kh kw)`` on every tap."""

    label = "1x1-avg"

    def __init__(self, geometry: ConvGeometry, bn: bool, factory: Factory = NO_FACTORY) -> None:
        super().__init__(geometry)
        self.first = _kaiming_weight((geometry.out_channels, geometry.in_channels // geometry.groups, 1, 1), factory)
        self.first_bn = _optional_bn(geometry.out_channels, bn, factory)
        self.second_bn = _optional_bn(geometry.out_channels, bn, factory)

    def forward(self, x: Tensor) -> Tensor:
        g = self.geometry
        y, padding = _first_stage(self, x)
        pool = average_kernel(g.out_channels, g.out_channels, g.kernel_size, dtype=y.dtype, device=y.device)
        y = F.conv2d(y, pool, None, g.stride, padding, g.dilation, g.out_channels)
        return y if self.second_bn is None else self.second_bn(y)

    def kernel(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
        kh, kw = self.geometry.kernel_size
        first, bias = _maybe_fold(self.first.to(dtype or self.first.dtype), None, self.first_bn)
        weight = first.expand(-1, -1, kh, kw) / (kh * kw)
        return _maybe_fold(weight, bias, self.second_bn)

    def masks(self, approximate: bool = False) -> list[Tensor]:
        if self.geometry.kernel_size == (1, 1):  # averaging one tap is the identity: a 1x1 mask
            return [self._full_mask()]
        return self._not_mask(
            approximate,
            "one trainable weight per channel pair is spread over the whole KxK window, so J J^T is not "
            "diagonal (use the block's spatial_preconditioner())",
        )

    @torch.no_grad()
    def silence(self) -> None:
        if self.second_bn is not None:
            _silence_bn(self.second_bn)
        else:
            self.first.zero_()

    def spatial_jacobian(self) -> Tensor:
        self._require_linear(self.first_bn)
        kh, kw = self.geometry.kernel_size
        return torch.full((kh * kw, 1), 1.0 / (kh * kw), dtype=torch.float64)
