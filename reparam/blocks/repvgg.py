"""RepVGG block: KxK + 1x1 + identity."""
from __future__ import annotations

from reparam.blocks.base import ReparamBlock
from reparam.blocks.branches import Branch, ConvBranch, Factory, IdentityBranch
from reparam.blocks.geometry import ConvGeometry


class RepVGGBlock(ReparamBlock):
    """KxK + 1x1 convs, plus the identity when ``in == out`` and stride is 1.

    ``G = 1 + M_centre`` (3x3: ones with 2 at the centre). Without BN the identity is the
    constant kernel ``C`` returned by :meth:`constant_kernel`. With a 1x1 kernel the 1x1
    branch would be a copy of the KxK one (only doubling its learning rate) and is not built:
    1x1 + identity, ``G = 1``.
    """

    def _make_branches(self, geometry: ConvGeometry, branch_bn: bool, factory: Factory) -> dict[str, Branch]:
        branches: dict[str, Branch] = {"kxk": ConvBranch(geometry, geometry.kernel_size, branch_bn, "kxk", factory)}
        if geometry.kernel_size != (1, 1):
            branches["1x1"] = ConvBranch(geometry, (1, 1), branch_bn, "1x1", factory)
        if geometry.in_channels == geometry.out_channels and geometry.stride == (1, 1):
            branches["identity"] = IdentityBranch(geometry, branch_bn, factory)
        return branches
