"""Asymmetric Convolution Block (ACNet): KxK + 1xK + Kx1."""
from __future__ import annotations

from reparam.blocks.base import ReparamBlock
from reparam.blocks.branches import Branch, ConvBranch, Factory
from reparam.blocks.geometry import ConvGeometry


class ACBlock(ReparamBlock):
    """KxK + 1xK + Kx1 convs, all centred; ``G = M_KxK + M_1xK + M_Kx1``
    (3x3: ``[[1, 2, 1], [2, 3, 2], [1, 2, 1]]``).

    A kernel side of 1 makes an asymmetric branch a copy of the square one, which would only
    multiply the learning rate of its taps; copies are not built: a 1xK kernel has the 1xK and
    the 1x1 branch (``G = 1`` plus 1 at the centre), a 1x1 kernel the square branch alone
    (``G = 1``, a plain conv).
    """

    def _make_branches(self, geometry: ConvGeometry, branch_bn: bool, factory: Factory) -> dict[str, Branch]:
        kh, kw = geometry.kernel_size
        windows: dict[tuple[int, int], str] = {}
        for label, window in (("square", (kh, kw)), ("horizontal", (1, kw)), ("vertical", (kh, 1))):
            windows.setdefault(window, label)  # the first branch with a window keeps it
        return {label: ConvBranch(geometry, window, branch_bn, label, factory) for window, label in windows.items()}
