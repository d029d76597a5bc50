"""The default equivalence suite: blocks x BN placement x optimizers x {auto, wrong} mode,
each case carrying the verdict theory expects."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from reparam.blocks import BLOCKS, BN_PLACEMENTS
from reparam.sgs.theory import auto_mode
from verification.engine import compare_trajectories
from verification.tolerances import check_steps, single_thread

SECTION = "sgs"


@dataclass(frozen=True)
class OptimizerCase:
    """A named optimizer configuration (and an optional LR schedule)."""

    name: str
    factory: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
    scheduler: Callable[[torch.optim.Optimizer], object] | None = None

    @property
    def auto_mode(self) -> str:
        """The mode ``attach_sgs(mode="auto", strict=False)`` applies: the exact one, ``grad``
        (preferred) for SGD and ``update`` for the adaptive optimizers, else the ``grad`` fallback."""
        optimizer = self.factory([torch.nn.Parameter(torch.zeros(1))])
        return auto_mode(optimizer, optimizer.param_groups)

    @property
    def wrong_mode(self) -> str:
        """The deliberately wrong mode: the one "auto" does not apply, so each case pair runs both
        (for Adam with coupled decay, auto falls back to ``grad`` and the control is ``update``)."""
        return "update" if self.auto_mode == "grad" else "grad"


def _exp_schedule(gamma: float) -> Callable[[torch.optim.Optimizer], object]:
    return lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma)


def _cosine(t_max: int) -> Callable[[torch.optim.Optimizer], object]:
    return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, t_max)


O = torch.optim
OPTIMIZERS: tuple[OptimizerCase, ...] = (
    OptimizerCase("sgd", lambda p: O.SGD(p, lr=0.1)),
    OptimizerCase("sgd-momentum", lambda p: O.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-3), _exp_schedule(0.9)),
    OptimizerCase("sgd-nesterov-wd", lambda p: O.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    OptimizerCase("sgd-dampening", lambda p: O.SGD(p, lr=0.05, momentum=0.8, dampening=0.3), _cosine(10)),
    OptimizerCase("adam", lambda p: O.Adam(p, lr=1e-2, betas=(0.8, 0.95))),
    OptimizerCase("adamw", lambda p: O.AdamW(p, lr=1e-2, weight_decay=0.1), _cosine(10)),
    OptimizerCase("adamax", lambda p: O.Adamax(p, lr=1e-2)),
    OptimizerCase("nadam", lambda p: O.NAdam(p, lr=1e-2)),
    OptimizerCase("radam", lambda p: O.RAdam(p, lr=1e-2)),
    OptimizerCase("adagrad", lambda p: O.Adagrad(p, lr=5e-2, lr_decay=1e-3)),
    OptimizerCase("rmsprop-centered-momentum", lambda p: O.RMSprop(p, lr=1e-3, momentum=0.5, centered=True)),
    OptimizerCase("adadelta", lambda p: O.Adadelta(p, lr=1.0)),
    OptimizerCase("adam-coupled-wd", lambda p: O.Adam(p, lr=1e-2, weight_decay=0.1)),
)
OPTIMIZER_NAMES = tuple(o.name for o in OPTIMIZERS)


@dataclass(frozen=True)
class SuiteCase:
    block: str
    bn: str
    optimizer: OptimizerCase
    mode: str  # "auto" or the deliberately wrong mode

    @property
    def name(self) -> str:
        kind = "auto" if self.mode == "auto" else f"wrong:{self.mode}"
        return f"{self.block}/{self.bn}/{self.optimizer.name}/{kind}"

    def block_factory(self, channels: int = 4, kernel_size: int = 3):
        cls, bn = BLOCKS[self.block], self.bn
        return lambda: cls(channels, channels, kernel_size, bn=bn)


def default_cases(
    blocks: Sequence[str] | None = None,
    bns: Sequence[str] | None = None,
    optimizers: Sequence[str] | None = None,
) -> list[SuiteCase]:
    """The cross product, in a stable order. Unknown names raise ValueError naming them."""
    blocks = list(blocks or BLOCKS)
    bns = list(bns or BN_PLACEMENTS)
    optimizers = list(optimizers or OPTIMIZER_NAMES)
    choices = (("block", blocks, BLOCKS), ("bn", bns, BN_PLACEMENTS), ("optimizer", optimizers, OPTIMIZER_NAMES))
    for label, chosen, known in choices:
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise ValueError(f"unknown {label} {unknown}; choose from {list(known)}")
    by_name = {o.name: o for o in OPTIMIZERS}
    return [
        SuiteCase(block, bn, by_name[opt], mode)
        for block in blocks
        for bn in bns
        for opt in optimizers
        for mode in ("auto", by_name[opt].wrong_mode)
    ]


def run_case(case: SuiteCase, steps: int, dtype: torch.dtype, device: str, seed: int) -> tuple[dict, pd.DataFrame]:
    """One case: its summary row and its per-step deviation curve."""
    result = compare_trajectories(
        case.block_factory(), case.optimizer.factory, steps=steps, dtype=dtype, device=device, seed=seed,
        mode=case.mode, scheduler_factory=case.optimizer.scheduler,
    )
    frame = result.frame
    sgs = frame[frame.side == "sgs"]
    row = dict(
        section=SECTION, case=case.name, expected=result.expected["sgs"], observed=result.verdicts["sgs"],
        max_abs_dev=float(sgs.max_abs.max()), max_rel_dev=result.max_deviation["sgs"], match=result.matches,
        detail=result.reasons["sgs"], block=case.block, bn=case.bn, optimizer=case.optimizer.name,
        mode=case.mode, applied_mode=result.sgs_mode,
        merged_expected=result.expected.get("merged", ""), merged_observed=result.verdicts.get("merged", ""),
        merged_max_rel_dev=result.max_deviation.get("merged", float("nan")),
    )
    curves = frame[["step", "side", "max_rel"]].rename(columns={"max_rel": "rel_dev"})
    curves.insert(0, "case", case.name)
    curves.insert(0, "section", SECTION)
    return row, curves


def run_sgs_section(
    cases: Sequence[SuiteCase],
    steps: int = 20,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every case; returns ``(summary, curves)`` frames (one row per case / per step and side)."""
    check_steps(steps, "run_sgs_section")
    rows, curves = [], []
    for case in tqdm(cases, desc="sgs equivalence", unit="case", disable=not progress, leave=False):
        with single_thread():
            row, curve = run_case(case, steps, dtype, device, seed)
        rows.append(row)
        curves.append(curve)
    return pd.DataFrame(rows), pd.concat(curves, ignore_index=True)
