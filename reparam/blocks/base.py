"""The common machinery of every multi-branch block: forward, fusion, masks."""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reparam.blocks.branches import Branch, Factory
from reparam.blocks.geometry import ConvGeometry, IntPair
from reparam.errors import ConfigError, NotMaskEquivalent
from reparam.kernels import fold_batchnorm

BNPlacement = Literal["branch", "after", "none"]
BN_PLACEMENTS = ("branch", "after", "none")
#: the forms a block can run its forward in (the block attribute keeps the name ``mode``)
BLOCK_FORMS = ("branched", "merged")


class ReparamBlock(nn.Module):
    """A conv layer trained as a sum of branches and deployable as one ``nn.Conv2d``.

    The constructor mirrors ``nn.Conv2d`` (including the ``device`` / ``dtype`` factory
    arguments; ``padding`` may be ints, None for ``dilation * (k // 2)``, ``"same"`` at
    stride 1 or ``"valid"``). ``bn`` places normalization:
    ``"branch"`` (a BatchNorm inside every branch, as in the original papers), ``"after"``
    (one BatchNorm after the sum) or ``"none"`` (a bias on the merged conv).
    ``mode`` is the block's *form* (:data:`BLOCK_FORMS`; unrelated to the SGS modes of
    ``attach_sgs``). In ``mode="merged"`` (only for ``bn`` "none"/"after", where the block is linear in its
    input with no batch statistics inside) the forward runs one conv with the
    differentiably merged kernel; gradients reach the same branch parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair | str | None = None,
        dilation: IntPair = 1,
        groups: int = 1,
        bn: BNPlacement = "branch",
        mode: str = "branched",
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if bn not in BN_PLACEMENTS:
            raise ConfigError(f"{name}: bn={bn!r} is not supported; choose one of {BN_PLACEMENTS}")
        if padding_mode != "zeros":
            raise ConfigError(
                f"{name}: padding_mode={padding_mode!r} is not supported; only 'zeros' keeps every branch "
                "(including BN-and-pad rings) exactly fusable"
            )
        self.geometry = ConvGeometry.from_args(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, block=name
        )
        self.bn = bn
        factory = {"device": device, "dtype": dtype}
        self.branches = nn.ModuleDict(self._make_branches(self.geometry, bn == "branch", factory))
        channels = self.geometry.out_channels
        self.post_bn = nn.BatchNorm2d(channels, **factory) if bn == "after" else None
        self.bias = nn.Parameter(torch.zeros(channels, **factory)) if bn == "none" else None
        self.mode = mode

    # -- construction hooks -------------------------------------------------------------
    def _make_branches(self, geometry: ConvGeometry, branch_bn: bool, factory: Factory) -> dict[str, Branch]:
        """The branches, their parameters and buffers created with ``factory`` (device, dtype)."""
        raise NotImplementedError

    # -- nn.Conv2d-like attributes ------------------------------------------------------
    in_channels = property(lambda self: self.geometry.in_channels)
    out_channels = property(lambda self: self.geometry.out_channels)
    kernel_size = property(lambda self: self.geometry.kernel_size)
    stride = property(lambda self: self.geometry.stride)
    padding = property(lambda self: self.geometry.padding)
    dilation = property(lambda self: self.geometry.dilation)
    groups = property(lambda self: self.geometry.groups)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in BLOCK_FORMS:
            raise ConfigError(f"{type(self).__name__}: mode={value!r} is not supported; choose one of {BLOCK_FORMS}")
        if value == "merged" and self.bn == "branch":
            raise ConfigError(
                f"{type(self).__name__}: mode='merged' needs bn='none' or 'after'; with bn='branch' the "
                "per-branch batch statistics make the block non-linear during training"
            )
        self._mode = value

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, "
            f"padding={g.padding}, dilation={g.dilation}, groups={g.groups}, bn={self.bn!r}, mode={self.mode!r}"
        )

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "merged":
            weight, bias = self.merged_kernel(post_bn=False)
            out = F.conv2d(x, weight, bias, **self.geometry.conv_kwargs())
        else:
            branch_outputs = [branch(x) for branch in self.branches.values()]
            out = branch_outputs[0]
            for y in branch_outputs[1:]:
                out = out + y
            if self.bias is not None:
                out = out + self.bias.reshape(1, -1, 1, 1)
        return out if self.post_bn is None else self.post_bn(out)

    # -- fusion -------------------------------------------------------------------------
    def _reference(self) -> Tensor:
        return next(iter(self.parameters()))

    def merged_kernel(self, post_bn: bool = True, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
        """The block as one conv ``(weight, bias)``, differentiable in the branch parameters.

        ``W = sum_n K_n`` with every branch kernel ``K_n`` centred in the full kernel and its
        own BatchNorm folded with running statistics (``W' = W gamma/sigma``,
        ``b' = beta - mu gamma/sigma``); plus the block bias (``bn="none"``). With
        ``post_bn=True`` the BatchNorm after the sum (``bn="after"``) is folded too, giving
        the eval-mode function; ``post_bn=False`` gives the kernel that the post-sum BN
        consumes (the trainable linear kernel). ``bias`` is None where it is identically 0.
        """
        dtype = dtype or self._reference().dtype
        weight, bias = None, None
        for branch in self.branches.values():
            w, b = branch.kernel(dtype)
            weight = w if weight is None else weight + w
            if b is not None:
                bias = b if bias is None else bias + b
        if self.bias is not None:
            bias = self.bias.to(dtype) if bias is None else bias + self.bias.to(dtype)
        if post_bn and self.post_bn is not None:
            weight, bias = fold_batchnorm(weight, bias, self.post_bn)
        return weight, bias

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """A new ``nn.Conv2d`` whose output equals this block's eval-mode output.

        The fusion is computed in float64 and cast back to the block's dtype/device.
        """
        ref = self._reference()
        weight, bias = self.merged_kernel(post_bn=True, dtype=torch.float64)
        conv = self._plain_conv(bias=True)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))
        return conv.to(device=ref.device, dtype=ref.dtype)

    def _plain_conv(self, bias: bool) -> nn.Conv2d:
        g = self.geometry
        ref = self._reference()
        return nn.Conv2d(
            g.in_channels, g.out_channels, g.kernel_size, g.stride, g.padding, g.dilation, g.groups,
            bias=bias, device=ref.device, dtype=ref.dtype,
        )

    @torch.no_grad()
    def sgs_counterpart(self) -> nn.Module:
        """The plain layer that SGS trains in place of this block, computing the same
        function at the current state:

        - ``bn="none"``: one ``nn.Conv2d`` with bias, ``W = merged kernel`` (constant part included);
        - ``bn="after"``: ``nn.Sequential(conv without bias, copy of the post-sum BatchNorm)``;
        - ``bn="branch"``: the paper's form, ``nn.Sequential(conv, BatchNorm)`` whose eval
          output equals the block's (conv = fused kernel, BN = identity with shift = fused bias).
          Training it is only an approximation of training the block.
        """
        if self.bn == "branch":
            weight, bias = self.merged_kernel(post_bn=True, dtype=torch.float64)
            conv = self._plain_conv(bias=False)
            conv.weight.copy_(weight)
            ref = self._reference()
            bn = nn.BatchNorm2d(self.out_channels, device=ref.device, dtype=ref.dtype)
            bn.bias.copy_(bias)
            bn.running_var.fill_(1.0 - bn.eps)
            return nn.Sequential(conv, bn)
        weight, bias = self.merged_kernel(post_bn=False, dtype=torch.float64)
        conv = self._plain_conv(bias=self.bn == "none")
        conv.weight.copy_(weight)
        if conv.bias is not None:
            conv.bias.copy_(bias)
        return conv if self.post_bn is None else nn.Sequential(conv, copy.deepcopy(self.post_bn))

    # -- the gradient form ---------------------------------------------------------------
    def branch_masks(self, approximate: bool = False) -> list[Tensor]:
        """Binary ``(kh, kw)`` receptive fields ``M_n`` of the trainable mask branches.

        Raises :class:`NotMaskEquivalent` naming the branch when one is not a mask; with
        ``approximate=True`` such a branch counts as its full receptive field (the SGS
        paper's mask-sum, an approximation).
        """
        return [m for branch in self.branches.values() for m in branch.masks(approximate)]

    def sgs_mask(self, approximate: bool = False) -> Tensor:
        """``G = sum_n M_n``: the spatial gradient scaling equivalent to the branches."""
        masks = self.branch_masks(approximate)
        return torch.stack(masks).sum(0)

    def constant_kernel(self) -> Tensor:
        """The parameter-free part ``C`` of the merged (pre-BN) kernel, e.g. RepVGG's identity
        without BN; zeros if there is none. Weight decay on the branches pulls ``W`` toward ``C``."""
        total = torch.zeros(self.geometry.weight_shape, dtype=self._reference().dtype, device=self._reference().device)
        for branch in self.branches.values():
            c = branch.constant()
            if c is not None:
                total = total + c.to(total.dtype)
        return total

    def spatial_preconditioner(self) -> Tensor:
        """``P = J J^T`` restricted to one channel pair: a ``(kh*kw, kh*kw)`` float64 matrix.

        For branches that are linear in their parameters and act alike on every channel
        pair, one SGD step on the branches moves the merged kernel by ``-lr * P g`` (per
        channel pair, ``g`` flattened over the taps). For mask branches ``P = diag(G)``.
        Raises :class:`NotMaskEquivalent` for BN-inside or product branches.
        """
        kh, kw = self.geometry.kernel_size
        total = torch.zeros(kh * kw, kh * kw, dtype=torch.float64)
        for branch in self.branches.values():
            jac = branch.spatial_jacobian()
            if jac is not None:
                total = total + jac @ jac.T
        return total

    def sgs_exactness(self) -> tuple[bool, list[str]]:
        """Whether SGS with ``sgs_mask()`` reproduces training this block exactly, and why not."""
        reasons = []
        if self.bn == "branch":
            reasons.append("a BatchNorm inside each branch: training-mode batch statistics depend on the branch weights")
        for branch in self.branches.values():
            try:
                branch.masks()
            except NotMaskEquivalent as err:
                reasons.append(str(err))
        return not reasons, reasons
