"""Diverse Branch Block: KxK + 1x1 + (1x1 -> KxK) + (1x1 -> KxK average)."""
from __future__ import annotations

from collections.abc import Sequence

from reparam.blocks.base import ReparamBlock
from reparam.blocks.branches import AverageBranch, Branch, ConvBranch, Factory, SequentialBranch
from reparam.blocks.geometry import ConvGeometry
from reparam.errors import ConfigError

DBB_BRANCHES = ("kxk", "1x1", "1x1_kxk", "1x1_avg")


class DBBlock(ReparamBlock):
    """KxK + 1x1 + (1x1 -> KxK) + (1x1 -> average pool). The sequential and average branches
    are padded with their first stage's zero response so fusion stays exact at the border.

    ``branches`` selects a subset of ``("kxk", "1x1", "1x1_kxk", "1x1_avg")`` (default all).
    With a 1x1 kernel ``kxk``, ``1x1`` and ``1x1_avg`` are the same 1x1 conv (an average over
    one tap is the identity); they are built as selected, since ``branches`` is an explicit
    choice: select one of them to avoid copies (ACB and RepVGG drop their copies themselves).
    ``sgs_mask()`` raises :class:`reparam.NotMaskEquivalent` for the last two; without BN and
    without ``1x1_kxk`` the block is linear and :meth:`spatial_preconditioner` is exact.
    """

    def __init__(self, *args, branches: Sequence[str] = DBB_BRANCHES, **kwargs) -> None:
        unknown = [b for b in branches if b not in DBB_BRANCHES]
        if unknown or not branches:
            raise ConfigError(f"DBBlock: branches {list(branches)} invalid; choose a non-empty subset of {DBB_BRANCHES}")
        self._branch_names = tuple(b for b in DBB_BRANCHES if b in branches)
        super().__init__(*args, **kwargs)

    def _make_branches(self, geometry: ConvGeometry, branch_bn: bool, factory: Factory) -> dict[str, Branch]:
        makers = {
            "kxk": lambda: ConvBranch(geometry, geometry.kernel_size, branch_bn, "kxk", factory),
            "1x1": lambda: ConvBranch(geometry, (1, 1), branch_bn, "1x1", factory),
            "1x1_kxk": lambda: SequentialBranch(geometry, branch_bn, factory),
            "1x1_avg": lambda: AverageBranch(geometry, branch_bn, factory),
        }
        return {name: makers[name]() for name in self._branch_names}
