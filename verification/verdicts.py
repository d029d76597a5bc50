"""Verdicts of a trajectory comparison and what theory expects them to be."""
from __future__ import annotations

import torch

from reparam.blocks import ReparamBlock
from reparam.errors import NotMaskEquivalent
from reparam.sgs import SpatialPreconditioner
from reparam.sgs.theory import auto_mode, inexact_reasons_for_steps, why_exact
from verification.tolerances import (  # noqa: F401  (re-exported)
    APPROXIMATE,
    DIVERGENCE_FLOOR,
    DIVERGES,
    EXACT,
    EXACT_TOL,
    INCONCLUSIVE,
    MOVEMENT_MARGIN,
    classify,
    min_movement,
)


def structural_exactness(block: ReparamBlock, transform: str = "mask") -> tuple[bool, list[str]]:
    """Whether the block has an exact gradient form of the given kind (``mask`` or ``preconditioner``)."""
    if transform == "mask":
        return block.sgs_exactness()
    if block.bn == "branch":
        return False, ["a BatchNorm inside each branch"]
    try:
        block.spatial_preconditioner()
    except NotMaskEquivalent as err:
        return False, [str(err)]
    return True, []


def expected_verdict(
    block: ReparamBlock, optimizer: torch.optim.Optimizer, mode: str, transform: str = "mask", steps: int | None = None
) -> tuple[str, str]:
    """The verdict theory predicts for SGS training vs branched training over ``steps`` steps
    (``None``: arbitrarily many), with the reason (why it is exact, or why not)."""
    exact_struct, reasons = structural_exactness(block, transform)
    if not exact_struct:
        return APPROXIMATE, "; ".join(reasons)
    nondiagonal = transform == "preconditioner" and not SpatialPreconditioner(block.spatial_preconditioner()).is_diagonal()
    groups = optimizer.param_groups
    chosen = mode if mode != "auto" else auto_mode(optimizer, groups, nondiagonal)
    reason = inexact_reasons_for_steps(optimizer, groups, steps if steps is not None else 1 << 30, nondiagonal)[chosen]
    if reason is None:
        return EXACT, why_exact(optimizer, groups, chosen, steps)
    return DIVERGES, reason

