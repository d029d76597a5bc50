"""What reparam needs to know about a branched block it did not build: its linear core, the
conv it fuses to, the receptive fields of its conv branches, and its deploy form."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from reparam.blocks.geometry import ConvGeometry
from reparam.errors import ConversionError
from reparam.kernels import centre_pad, fold_batchnorm, identity_kernel, window_mask
from reparam.kernels.response import conv_response


class Adapter:
    """One recognised branched block.

    - :meth:`core`: the part of the block that is a sum of branches (the conv it fuses to),
      as a module sharing the block's submodules (so analysis sees the block's live state);
    - :meth:`geometry`: that conv's geometry; :meth:`conv_windows`: the receptive fields of
      the trainable conv branches (for the SGS paper's mask-sum where no exact form exists);
    - :meth:`deploy`: the block's deploy form holding a given fused ``(weight, bias)``;
      ``deploy_attr`` names the conv inside it (``"reparam_conv"`` for timm, whose
      ``reparameterize_model`` produces ``<block>.reparam_conv.weight``), or None when the
      deploy form *is* the conv (it replaces the block: ``<block>.weight``).
    """

    kind = "branched block"
    deploy_attr: str | None = "reparam_conv"
    #: the training-form attributes the deploy form drops
    branch_attrs: tuple[str, ...] = ()

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    def core(self) -> nn.Module:
        raise NotImplementedError

    def kernel_module(self) -> KernelModule:
        """A module whose ``forward()`` returns the fused eval-mode ``(weight, bias)``,
        differentiable in the block's parameters (it shares the block's submodules). Default:
        the impulse response of :meth:`core` (costs ``in_channels`` forward passes)."""
        return ResponseKernel(self.core(), self.geometry())

    def geometry(self) -> ConvGeometry:
        raise NotImplementedError

    def conv_windows(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def approximate_mask(self) -> Tensor:
        """The SGS paper's mask-sum ``G = sum_n M_n`` over the conv branches' receptive fields
        (float64, ``(kh, kw)``): what SGS uses where no exact form exists."""
        size = self.geometry().kernel_size
        return sum((window_mask(w, size, torch.float64) for w in self.conv_windows()),
                   torch.zeros(size, dtype=torch.float64))

    def deploy(self, weight: Tensor, bias: Tensor) -> nn.Module:
        """A copy of the block in its own deploy form (its ``reparameterize()``; for a variant
        that method cannot fuse, e.g. with BatchNorms removed, the same form built here: the
        ``branch_attrs`` deleted and a plain conv at ``deploy_attr``), whose conv holds
        ``weight``/``bias`` (cast to the block's dtype/device)."""
        deployed = copy.deepcopy(self.block)
        try:
            deployed.reparameterize()
        except Exception:  # noqa: BLE001 - whatever their fusion chokes on, the deploy form is known
            deployed = copy.deepcopy(self.block)
            for attr in self.branch_attrs:
                if hasattr(deployed, attr):
                    delattr(deployed, attr)
            g = self.geometry()
            setattr(deployed, self.deploy_attr or "", nn.Conv2d(g.in_channels, g.out_channels, g.kernel_size, g.stride,
                                                                g.padding, g.dilation, g.groups))
            if hasattr(deployed, "inference_mode"):
                deployed.inference_mode = True
        conv = getattr(deployed, self.deploy_attr or "", None)
        if not isinstance(conv, nn.Conv2d):
            raise ConversionError(f"{self.kind}: reparameterize() left no nn.Conv2d at {self.deploy_attr!r}")
        _load_conv(conv, weight, bias, _reference(self.block))
        deployed.train(self.block.training)
        return deployed

    def weight_suffix(self) -> str:
        """The deploy conv's weight name relative to the block."""
        return f"{self.deploy_attr}.weight" if self.deploy_attr else "weight"


def _reference(module: nn.Module) -> Tensor:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor
    return torch.zeros(())


@torch.no_grad()
def _load_conv(conv: nn.Conv2d, weight: Tensor, bias: Tensor, like: Tensor) -> None:
    conv.to(device=like.device, dtype=like.dtype)
    conv.weight.copy_(weight)
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.zeros_like(conv.weight[:, 0, 0, 0]))
    conv.bias.copy_(bias)


def conv_geometry(conv: nn.Conv2d, name: str) -> ConvGeometry:
    """The geometry of ``conv`` (integer padding only: a 'same'-padded or dynamically padded conv
    has no static geometry)."""
    padding = conv.padding
    if isinstance(padding, str):
        padding = 0 if padding == "valid" else None
    return ConvGeometry.from_args(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation, conv.groups,
        block=name,
    )


class SumCore(nn.Module):
    """``drop_path(sum of branches(x)) + identity(x)``: the linear core of RepVGG / MobileOne /
    large-kernel blocks (None entries are absent branches)."""

    def __init__(self, branches: list[nn.Module], identity: nn.Module | None = None,
                 drop_path: nn.Module | None = None) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.identity = identity
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        out = None
        for branch in self.branches:
            y = branch(x)
            out = y if out is None else out + y
        if out is not None and self.drop_path is not None:
            out = self.drop_path(out)
        if self.identity is not None:
            out = self.identity(x) if out is None else out + self.identity(x)
        if out is None:
            raise ConversionError("a block without any branch has no conv to fuse to")
        return out


class KernelModule(nn.Module):
    """``forward()`` -> the fused eval-mode ``(weight, bias)`` of ``core`` (a conv of ``geometry``)."""

    def __init__(self, core: nn.Module, geometry: ConvGeometry) -> None:
        super().__init__()
        self.core = core
        self.geometry = geometry


class ResponseKernel(KernelModule):
    """The generic path: the impulse response of the core (any module affine in its input)."""

    def forward(self) -> tuple[Tensor, Tensor]:
        ref = _reference(self.core)
        return conv_response(self.core, self.geometry, ref.dtype, ref.device)


def _zeros_bias(weight: Tensor) -> Tensor:
    return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


def unit_kernel(unit: nn.Module, geometry: ConvGeometry) -> tuple[Tensor, Tensor]:
    """The kernel of one branch, in closed form when it is a conv, a conv followed by a
    BatchNorm (``.conv`` and ``.bn``, as timm's ConvNormAct), a BatchNorm (identity with BN) or
    the identity; else its impulse response. The block's check against its own forward
    confirms every closed form (e.g. that a BN subclass adds nothing but BN in eval)."""
    size = geometry.kernel_size
    batchnorm = nn.modules.batchnorm._BatchNorm
    conv = unit if isinstance(unit, nn.Conv2d) else getattr(unit, "conv", None)
    bn = None if conv is unit else getattr(unit, "bn", None)
    if isinstance(conv, nn.Conv2d) and isinstance(getattr(unit, "aa", None), (type(None), nn.Identity)) and (
        bn is None or isinstance(bn, (nn.Identity, batchnorm))
    ):
        weight = centre_pad(conv.weight, size)
        bias = conv.bias if conv.bias is not None else _zeros_bias(weight)
        return fold_batchnorm(weight, bias, bn) if isinstance(bn, batchnorm) else (weight, bias)
    if isinstance(unit, (nn.Identity, batchnorm)):
        ref = _reference(unit) if isinstance(unit, batchnorm) else None
        dtype = ref.dtype if ref is not None else torch.float64
        ident = identity_kernel(geometry.out_channels, geometry.groups, size, dtype=dtype)
        return fold_batchnorm(ident, None, unit) if ref is not None else (ident, _zeros_bias(ident))
    ref = _reference(unit)
    return conv_response(unit, geometry, ref.dtype, ref.device)


class SumKernel(KernelModule):
    """Closed-form fused kernel of a :class:`SumCore`: the sum of its units' kernels."""

    def forward(self) -> tuple[Tensor, Tensor]:
        units = [*self.core.branches] + ([self.core.identity] if self.core.identity is not None else [])
        weight, bias = unit_kernel(units[0], self.geometry)
        for unit in units[1:]:
            w, b = unit_kernel(unit, self.geometry)
            weight, bias = weight + w, bias + b
        return weight, bias
