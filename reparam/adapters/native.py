"""This project's :class:`reparam.blocks.ReparamBlock` and any module the user describes as a
sum of parallel branches: the generic path (impulse response + ``J J^T`` by autograd)."""
from __future__ import annotations

from torch import Tensor, nn

from reparam.adapters.base import Adapter, _load_conv, _reference, conv_geometry
from reparam.blocks import ReparamBlock
from reparam.blocks.geometry import ConvGeometry
from reparam.errors import ConversionError


class _PreBN(nn.Module):
    """A ReparamBlock without its post-sum BatchNorm: the linear kernel that BN consumes."""

    def __init__(self, block: ReparamBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        post, self.block.post_bn = self.block.post_bn, None
        try:
            return self.block(x)
        finally:
            self.block.post_bn = post


class ReparamBlockAdapter(Adapter):
    """reparam's own blocks. ``timm.utils.reparameterize_model`` replaces them by ``fuse()``, so
    the deploy form is the conv itself (``<block>.weight``). The core excludes ``post_bn``
    (one BN after the sum trains identically on both sides)."""

    kind = "reparam ReparamBlock"
    deploy_attr = None

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, ReparamBlock)

    def core(self) -> nn.Module:
        return _PreBN(self.block) if self.block.post_bn is not None else self.block

    def geometry(self) -> ConvGeometry:
        return self.block.geometry

    def conv_windows(self) -> list[tuple[int, int]]:
        raise NotImplementedError("ReparamBlock masks are not all centred windows; use approximate_mask()")

    def approximate_mask(self) -> Tensor:
        return self.block.sgs_mask(approximate=True).double()

    def deploy(self, weight: Tensor, bias: Tensor) -> nn.Module:
        conv = self.block.fuse()
        _load_conv(conv, weight, bias, _reference(self.block))
        conv.train(self.block.training)
        return conv


class GenericAdapter(Adapter):
    """Any module that computes a conv of its input (in eval mode): e.g. a user's own sum of
    parallel convs. ``geometry`` defaults to that of its conv with the widest receptive field;
    the deploy form is a plain ``nn.Conv2d`` replacing the module (``<block>.weight``)."""

    kind = "generic block"
    deploy_attr = None

    def __init__(self, block: nn.Module, geometry: ConvGeometry | None = None) -> None:
        super().__init__(block)
        self._geometry = geometry

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return False  # only on request: any module could be a conv

    def core(self) -> nn.Module:
        return self.block

    def _convs(self) -> list[nn.Conv2d]:
        return [m for m in self.block.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]

    def geometry(self) -> ConvGeometry:
        if self._geometry is not None:
            return self._geometry
        convs = [m for m in self.block.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ConversionError(f"{type(self.block).__name__} has no nn.Conv2d; give its conv geometry explicitly")
        widest = max(convs, key=lambda c: [(k - 1) * d for k, d in zip(c.kernel_size, c.dilation)])
        return conv_geometry(widest, type(self.block).__name__)

    def conv_windows(self) -> list[tuple[int, int]]:
        return [tuple(c.kernel_size) for c in self._convs()]  # type: ignore[misc]

    def deploy(self, weight: Tensor, bias: Tensor) -> nn.Module:
        g = self.geometry()
        conv = nn.Conv2d(g.in_channels, g.out_channels, g.kernel_size, g.stride, g.padding, g.dilation, g.groups)
        _load_conv(conv, weight, bias, _reference(self.block))
        conv.train(self.block.training)
        return conv
