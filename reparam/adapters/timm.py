"""timm's reparameterizable blocks, recognised by class (module + name, subclasses included) and
checked by structure, without importing timm.

- ``byobnet.RepVggBlock``: ``conv_kxk`` + ``conv_1x1`` (+ ``identity`` BN), then attn/act;
- ``byobnet.MobileOneBlock`` / ``fastvit.MobileOneBlock``: ``conv_kxk[*]`` + ``conv_scale``
  (+ ``identity`` BN), then se/attn/act;
- ``fastvit.ReparamLargeKernelConv``: ``large_conv`` + ``small_conv``, then se/act;
- ``fastvit.RepMixer``: ``x + layer_scale * (mixer(x) - norm(x))`` over two MobileOneBlocks
  (one deploy conv for the whole mixer: ``timm.utils.reparameterize_model`` fuses it as one).

The deploy form is the block's own ``reparameterize()`` with the fused kernel computed here in
float64; the deploy conv is ``<block>.reparam_conv``.
"""
from __future__ import annotations

from torch import Tensor, nn

from reparam.adapters.base import Adapter, KernelModule, SumCore, SumKernel, conv_geometry
from reparam.blocks.geometry import ConvGeometry
from reparam.kernels import identity_kernel


def _is_timm_class(module: nn.Module, name: str, submodule: str | None = None) -> bool:
    """``module`` is (a subclass of) timm's class ``name`` (in ``timm.models.<submodule>``)."""
    for cls in type(module).__mro__:
        where = cls.__module__ or ""
        if cls.__name__ == name and where.startswith("timm.") and (submodule is None or where.endswith(submodule)):
            return True
    return False


def _branched(module: nn.Module, *attrs: str) -> bool:
    """Still in training form (no ``reparam_conv`` yet) and has the branch attributes."""
    return getattr(module, "reparam_conv", None) is None and all(hasattr(module, a) for a in attrs)


def _conv_of(branch: nn.Module) -> nn.Conv2d:
    return branch.conv


def _window(branch: nn.Module) -> tuple[int, int]:
    return tuple(_conv_of(branch).kernel_size)  # type: ignore[return-value]


class _SumAdapter(Adapter):
    """A block whose core is a :class:`SumCore`: closed-form fused kernel."""

    def kernel_module(self) -> KernelModule:
        return SumKernel(self.core(), self.geometry())


class RepVggAdapter(_SumAdapter):
    kind = "timm RepVggBlock"
    branch_attrs = ("conv_kxk", "conv_1x1", "identity", "drop_path")

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return _is_timm_class(module, "RepVggBlock", "byobnet") and _branched(module, "conv_kxk", "conv_1x1", "identity")

    def _convs(self) -> list[nn.Module]:
        return [b for b in (self.block.conv_kxk, self.block.conv_1x1) if b is not None]

    def core(self) -> nn.Module:
        return SumCore(self._convs(), self.block.identity, getattr(self.block, "drop_path", None))

    def geometry(self) -> ConvGeometry:
        return conv_geometry(_conv_of(self.block.conv_kxk), self.kind)

    def conv_windows(self) -> list[tuple[int, int]]:
        return [_window(b) for b in self._convs()]


class MobileOneAdapter(_SumAdapter):
    kind = "timm MobileOneBlock"
    branch_attrs = ("conv_kxk", "conv_scale", "identity", "drop_path")

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return _is_timm_class(module, "MobileOneBlock") and _branched(module, "conv_kxk", "conv_scale", "identity")

    def _convs(self) -> list[nn.Module]:
        convs = list(self.block.conv_kxk or [])
        return convs + ([self.block.conv_scale] if self.block.conv_scale is not None else [])

    def core(self) -> nn.Module:
        return SumCore(self._convs(), self.block.identity, getattr(self.block, "drop_path", None))

    def geometry(self) -> ConvGeometry:
        if self.block.conv_kxk:
            return conv_geometry(_conv_of(self.block.conv_kxk[0]), self.kind)
        b = self.block  # fastvit's identity-only block (RepMixer's norm): geometry from its attributes
        return ConvGeometry.from_args(b.in_chs, b.out_chs, b.kernel_size, b.stride, None, b.dilation, b.groups,
                                      block=self.kind)

    def conv_windows(self) -> list[tuple[int, int]]:
        return [_window(b) for b in self._convs()]


class LargeKernelAdapter(_SumAdapter):
    kind = "timm ReparamLargeKernelConv"
    branch_attrs = ("large_conv", "small_conv")

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return _is_timm_class(module, "ReparamLargeKernelConv", "fastvit") and _branched(module, "large_conv")

    def _convs(self) -> list[nn.Module]:
        small = getattr(self.block, "small_conv", None)
        return [self.block.large_conv] + ([small] if small is not None else [])

    def core(self) -> nn.Module:
        return SumCore(self._convs())

    def geometry(self) -> ConvGeometry:
        return conv_geometry(_conv_of(self.block.large_conv), self.kind)

    def conv_windows(self) -> list[tuple[int, int]]:
        return [_window(b) for b in self._convs()]


class RepMixerAdapter(Adapter):
    """The whole forward ``x + layer_scale * (mixer(x) - norm(x))`` is the core (affine in x)."""

    kind = "timm RepMixer"
    branch_attrs = ("mixer", "norm", "layer_scale")

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return _is_timm_class(module, "RepMixer", "fastvit") and _branched(module, "mixer", "norm", "layer_scale")

    def core(self) -> nn.Module:
        return self.block

    def geometry(self) -> ConvGeometry:
        return MobileOneAdapter(self.block.mixer).geometry()

    def conv_windows(self) -> list[tuple[int, int]]:
        return MobileOneAdapter(self.block.mixer).conv_windows()

    def kernel_module(self) -> KernelModule:
        return _MixerKernel(self.block, self.geometry())


class _MixerKernel(KernelModule):
    """``W = I + s (W_mixer - W_norm)``, ``b = s (b_mixer - b_norm)`` with ``s`` the layer scale."""

    def __init__(self, block: nn.Module, geometry: ConvGeometry) -> None:
        super().__init__(block, geometry)
        self.mixer = MobileOneAdapter(block.mixer).kernel_module()
        self.norm = MobileOneAdapter(block.norm).kernel_module()

    def forward(self) -> tuple[Tensor, Tensor]:
        (wm, bm), (wn, bn) = self.mixer(), self.norm()
        g = self.geometry
        ident = identity_kernel(g.out_channels, g.groups, g.kernel_size, dtype=wm.dtype, device=wm.device)
        scale = getattr(self.core.layer_scale, "gamma", None)
        if scale is None:
            return ident + wm - wn, bm - bn
        return ident + scale.reshape(-1, 1, 1, 1) * (wm - wn), scale.reshape(-1) * (bm - bn)


TIMM_ADAPTERS: tuple[type[Adapter], ...] = (RepVggAdapter, MobileOneAdapter, LargeKernelAdapter, RepMixerAdapter)
