"""Verdict thresholds and the classification rule shared by every verification section.
Only depends on torch, so any section can use it."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

EXACT, APPROXIMATE, DIVERGES, INCONCLUSIVE = "exact", "approximate", "diverges", "inconclusive"

#: max relative deviation at or below which a trajectory counts as exact. float64: the
#: project's exactness bar (measured exact cases sit below 1e-13). float32: the default suite's
#: exact cases measured at most 1.5e-5 after 20 steps (9e-6 with ``--quick``); this leaves a margin.
EXACT_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
#: a non-exact trajectory must deviate at least this much, so that "exact" and "not exact"
#: are separated by a clear gap; anything in between is "inconclusive" and fails the suite.
#: The weakest negative control of the default suite is RAdam in grad mode (its first five
#: un-rectified steps are SGD-like and exact): 3e-3 in float32 with ``--quick`` (three rectified
#: steps), which is why the suite's RAdam case trains at a larger lr than Adam's.
DIVERGENCE_FLOOR = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.5}


#: an ``exact`` verdict also needs every compared side to have moved from its start by at
#: least this many times :data:`EXACT_TOL` (relative): with ``lr = 0``, zero gradients or frozen
#: parameters every comparison looks exact. At the margin a transform that did nothing would
#: deviate by the whole movement, far above the tolerance. The default suite's exact cases moved
#: at least 2.5e-2 relative in float32 with ``--quick`` (RAdam and Adadelta after 8 steps),
#: 2.5x the float32 bar; float64's bar is far below any real movement.
MOVEMENT_MARGIN = 100.0


def min_movement(dtype: torch.dtype) -> float:
    """The least relative movement an ``exact`` verdict needs: ``MOVEMENT_MARGIN * EXACT_TOL``."""
    return MOVEMENT_MARGIN * EXACT_TOL[dtype]


def classify(max_rel_dev: float, dtype: torch.dtype, approximation: bool, *, moved: float) -> str:
    """``exact`` at or below the tolerance, if the sides moved (relative movement ``moved``, the
    least of the compared sides) at least :func:`min_movement`, else ``inconclusive``; at or
    above the divergence floor ``approximate`` when theory offers only an approximation
    (per-branch BN, non-mask branches), else ``diverges``; NaN/inf ``diverges``."""
    if not math.isfinite(max_rel_dev):
        return DIVERGES
    if max_rel_dev <= EXACT_TOL[dtype]:
        return EXACT if moved >= min_movement(dtype) else INCONCLUSIVE
    if max_rel_dev >= DIVERGENCE_FLOOR[dtype]:
        return APPROXIMATE if approximation else DIVERGES
    return INCONCLUSIVE


#: trajectory lengths of ``reparam verify``: the default and ``--quick``
DEFAULT_STEPS, QUICK_STEPS = 20, 8


def check_steps(steps: object, where: str) -> int:
    """``steps`` if it is an int >= 1, else ValueError naming ``where``: a trajectory of no
    steps never moves, so every side would trivially be "exact"."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}: steps must be an int >= 1, got {steps!r}")
    return steps


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Disable TF32 (10-bit mantissa) in CUDA matmuls and cuDNN convolutions for the duration,
    restoring the previous settings after: an equivalence check compares trajectories to
    ~1e-10, far below TF32's ~1e-3 rounding. Harmless without a GPU (the flags are global)."""
    matmul = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")  # == torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny ops are dominated by intra-op threading overhead: run them on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
