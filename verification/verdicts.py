"""Verdicts of a trajectory comparison and what theory expects them to be."""
from __future__ import annotations

import torch

from reparam.blocks import ReparamBlock
from reparam.errors import NotMaskEquivalent
from reparam.sgs.theory import exact_mode, inexact_reasons

EXACT, APPROXIMATE, DIVERGES, INCONCLUSIVE = "exact", "approximate", "diverges", "inconclusive"

#: max relative deviation at or below which a trajectory counts as exact. float64: the
#: brief's 1e-10 (measured exact cases sit near 1e-15). float32: accumulated rounding of a
#: few dozen steps of tiny convs stays below 1e-5; 1e-4 leaves a margin.
EXACT_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
#: a non-exact trajectory must deviate at least this much, so that "exact" and "not exact"
#: are separated by a clear gap; anything in between is "inconclusive" and fails the suite.
DIVERGENCE_FLOOR = {torch.float64: 1e-6, torch.float32: 1e-2, torch.bfloat16: 0.5, torch.float16: 0.5}


def classify(max_rel_dev: float, dtype: torch.dtype, approximation: bool) -> str:
    """``exact`` below the tolerance; above the divergence floor ``approximate`` when theory
    offers only an approximation (per-branch BN, non-mask branches), else ``diverges``."""
    if max_rel_dev != max_rel_dev:  # NaN
        return DIVERGES
    if max_rel_dev <= EXACT_TOL[dtype]:
        return EXACT
    if max_rel_dev >= DIVERGENCE_FLOOR[dtype]:
        return APPROXIMATE if approximation else DIVERGES
    return INCONCLUSIVE


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
    block: ReparamBlock, optimizer: torch.optim.Optimizer, mode: str, transform: str = "mask"
) -> tuple[str, str]:
    """The verdict theory predicts for SGS training vs branched training, with the reason."""
    exact_struct, reasons = structural_exactness(block, transform)
    if not exact_struct:
        return APPROXIMATE, "; ".join(reasons)
    nondiagonal = transform == "preconditioner" and not _is_diagonal(block.spatial_preconditioner())
    groups = optimizer.param_groups
    chosen = mode if mode != "auto" else (exact_mode(optimizer, groups, nondiagonal) or "grad")
    reason = inexact_reasons(optimizer, groups, nondiagonal)[chosen]
    return (EXACT, f"mode {chosen!r} is exact for {type(optimizer).__name__}") if reason is None else (DIVERGES, reason)


def _is_diagonal(matrix: torch.Tensor) -> bool:
    return bool(torch.equal(matrix, torch.diag(torch.diagonal(matrix))))
