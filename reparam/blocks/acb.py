"""Asymmetric Convolution Block (ACNet): KxK + 1xK + Kx1."""
from __future__ import annotations

from reparam.blocks.base import ReparamBlock
from reparam.blocks.branches import Branch, ConvBranch, Factory
from reparam.blocks.geometry import ConvGeometry


class ACBlock(ReparamBlock):
    """KxK + 1xK + Kx1 convs, all centred; ``G = M_KxK + M_1xK + M_Kx1``
    (3x3: ``[[1, 2, 1], [2, 3, 2], [1, 2, 1]]``)."""

    def _make_branches(self, geometry: ConvGeometry, branch_bn: bool, factory: Factory) -> dict[str, Branch]:
        kh, kw = geometry.kernel_size
        return {
            "square": ConvBranch(geometry, (kh, kw), branch_bn, "square", factory),
            "horizontal": ConvBranch(geometry, (1, kw), branch_bn, "horizontal", factory),
            "vertical": ConvBranch(geometry, (kh, 1), branch_bn, "vertical", factory),
        }
