"""The one lock-step comparer: train several sides on the same batches, one step each in turn,
and record after every step how far they are apart (and how far each moved from its start).

Every verification section builds on it (the block engine, the PGT section, whole-model
verification); the deviation and movement measures live here too, so that every verdict is
computed the same way. Non-finite values are never skipped: a NaN or inf anywhere makes the
deviation ``inf``, and a non-finite loss is recorded as it is.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from verification.tolerances import check_steps

__all__ = [
    "Side",
    "deviation",
    "movement",
    "run_lockstep",
    "snapshot",
    "train_step",
    "worst",
]

#: ``loss_fn(model, batch) -> scalar loss``
LossFn = Callable[[nn.Module, Any], Tensor]
#: ``observe(step) -> row`` (a dict, or a list of dicts for one row per side)
Observer = Callable[[int], "dict | list[dict]"]


@dataclass
class Side:
    """One participant of a lock-step run: a model, the optimizer over its parameters and an
    optional LR scheduler (stepped after every optimizer step). ``loss_fn`` overrides the run's
    loss for this side; ``loss_scale`` ``S`` backpropagates ``S * loss`` and divides the gradients
    by ``S`` before the step (a static GradScaler, without inf-skipping)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    loss_fn: LossFn | None = None
    loss_scale: float = 1.0


def worst(values: Iterable[float]) -> float:
    """The largest of ``values``, ``inf`` if any is NaN or inf (pandas' and Python's ``max`` skip
    or mis-order NaN); ``0.0`` for no values."""
    result = 0.0
    for value in values:
        value = float(value)
        if not math.isfinite(value):
            return math.inf
        result = max(result, value)
    return result


def deviation(reference: Sequence[Tensor], other: Sequence[Tensor], per_tensor: bool = False) -> tuple[float, float]:
    """``(max_abs, max_rel)`` of ``other - reference`` over a set of tensors:
    ``max_abs = max_k ||o_k - r_k||_inf``; ``max_rel = max_abs / max_k ||r_k||_inf``, or with
    ``per_tensor`` ``max_k ||o_k - r_k||_inf / ||r_k||_inf`` (a zero reference scale counts as 1).
    ``(inf, inf)`` when any value of either side is NaN or inf. Empty sets raise ValueError."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"deviation needs two non-empty tensor sets of one length, got {len(reference)} and {len(other)}")
    diffs, scales = [], []
    with torch.no_grad():
        for ref, oth in zip(reference, other):
            if not ref.numel():
                continue
            # torch's max propagates NaN; a NaN/inf in either side makes one of the two non-finite
            diff, scale = float((oth.detach() - ref.detach()).abs().max()), float(ref.detach().abs().max())
            if not (math.isfinite(diff) and math.isfinite(scale)):
                return math.inf, math.inf
            diffs.append(diff)
            scales.append(scale)
    if not diffs:
        return 0.0, 0.0
    if per_tensor:
        rel = max(d / (s if s > 0 else 1.0) for d, s in zip(diffs, scales))
    else:
        scale = max(scales)
        rel = max(diffs) / (scale if scale > 0 else 1.0)
    return max(diffs), rel


def snapshot(tensors: Iterable[Tensor]) -> list[Tensor]:
    """Detached copies of ``tensors``: the start a side's :func:`movement` is measured from."""
    return [t.detach().clone() for t in tensors]


def movement(start: Sequence[Tensor], now: Sequence[Tensor]) -> tuple[float, float]:
    """How far a side moved from its start, ``(abs, rel)``: :func:`deviation` of ``now``
    from ``start`` (relative to the largest start value). A comparison is only evidence of
    exactness if both sides moved well beyond its tolerance."""
    return deviation(start, now)


def _batch_source(batches: Sequence | Iterable | Callable[[int], Any]) -> Callable[[int], Any]:
    """``step -> batch`` (steps from 1): a callable as it is, a sequence cycled, an iterable consumed."""
    if callable(batches):
        return batches
    if isinstance(batches, Sequence):
        if not batches:
            raise ValueError("run_lockstep: batches is empty")
        return lambda step: batches[(step - 1) % len(batches)]
    iterator: Iterator = iter(batches)
    return lambda step: next(iterator)


def train_step(side: Side, batch: Any, loss_fn: LossFn) -> float:
    """One step of one side: zero_grad, backward of the (scaled) loss, unscale, step, schedule.
    Returns the loss (NaN and inf are returned as they are, the step is taken regardless)."""
    side.optimizer.zero_grad(set_to_none=True)
    loss = (side.loss_fn or loss_fn)(side.model, batch)
    if loss.dim() > 0:
        loss = loss.sum()
    (loss * side.loss_scale if side.loss_scale != 1.0 else loss).backward()
    if side.loss_scale != 1.0:
        for param in side.model.parameters():
            if param.grad is not None:
                param.grad.div_(side.loss_scale)
    side.optimizer.step()
    if side.scheduler is not None:
        side.scheduler.step()
    return float(loss.detach())


def run_lockstep(
    sides: Sequence[Side],
    batches: Sequence | Iterable | Callable[[int], Any],
    loss_fn: LossFn | None,
    steps: int,
    observe: Observer,
    observe_start: bool = False,
) -> list[dict]:
    """Train ``sides`` in lock step for ``steps`` steps (>= 1) and return the observed rows.

    Step ``t`` (from 1): take the batch (``batches``: a sequence, cycled; an iterable; or a
    callable ``t -> batch``), then for each side in order :func:`train_step`, then call
    ``observe(t)``; its row (or each of its rows) gets ``step`` and ``loss_<side>`` for every
    side. ``observe_start`` also observes the untrained start as step 0 (losses NaN).
    """
    check_steps(steps, "run_lockstep")
    names = [side.name for side in sides]
    if len(set(names)) != len(names):
        raise ValueError(f"run_lockstep: side names must be distinct, got {names}")
    if loss_fn is None and any(side.loss_fn is None for side in sides):
        raise ValueError("run_lockstep: loss_fn is None, so every side needs its own Side.loss_fn")
    source = _batch_source(batches)
    rows: list[dict] = []

    def record(step: int, losses: dict[str, float]) -> None:
        observed = observe(step)
        for row in [observed] if isinstance(observed, dict) else observed:
            rows.append({"step": step, **row, **{f"loss_{name}": losses.get(name, math.nan) for name in names}})

    if observe_start:
        record(0, {})
    for step in range(1, steps + 1):
        batch = source(step)
        losses = {side.name: train_step(side, batch, loss_fn) for side in sides}
        record(step, losses)
    return rows
