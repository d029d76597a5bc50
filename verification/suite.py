"""The default equivalence suite: blocks x BN placement x optimizers x {auto, wrong}, each
case carrying the verdict theory expects.

Words: a case's ``applied`` is ``"auto"`` (SGS in the mode ``attach_sgs(mode="auto")`` picks)
or ``"wrong"`` (the other SGS mode, a negative control unless both are exact); its ``sgs_mode``
is the SGS mode (``grad``/``update``) the handle really applied. (A block's own ``mode``,
branched/merged, is a third thing.)"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from reparam.blocks import BLOCKS, BN_PLACEMENTS
from verification.engine import compare_trajectories
from verification.optimizers import BY_NAME, OPTIMIZER_NAMES, OPTIMIZERS, OptimizerCase  # noqa: F401 (re-exported)
from verification.schema import CURVE_COLUMNS, frames
from verification.tolerances import DEFAULT_STEPS, check_steps, single_thread

SECTION = "sgs"
#: a case's ``applied``: the SGS mode auto picks, or the other one
APPLIED = ("auto", "wrong")


@dataclass(frozen=True)
class SuiteCase:
    block: str
    bn: str
    optimizer: OptimizerCase
    applied: str  # one of APPLIED

    @property
    def requested_mode(self) -> str:
        """The ``mode`` passed to ``attach_sgs``: ``"auto"``, or the wrong SGS mode itself."""
        return "auto" if self.applied == "auto" else self.optimizer.wrong_mode

    @property
    def name(self) -> str:
        kind = "auto" if self.applied == "auto" else f"wrong:{self.requested_mode}"
        return f"{self.block}/{self.bn}/{self.optimizer.name}/{kind}"

    def block_factory(self, channels: int = 4, kernel_size: int = 3):
        cls, bn = BLOCKS[self.block], self.bn
        return lambda: cls(channels, channels, kernel_size, bn=bn)


def _check_names(label: str, chosen: Sequence[str], known: Sequence[str]) -> None:
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise ValueError(f"unknown {label} {unknown}; choose from {list(known)}")


def default_cases(
    blocks: Sequence[str] | None = None,
    bns: Sequence[str] | None = None,
    optimizers: Sequence[str] | None = None,
) -> list[SuiteCase]:
    """The cross product, in a stable order. Unknown names raise ValueError naming them."""
    blocks = list(blocks or BLOCKS)
    bns = list(bns or BN_PLACEMENTS)
    optimizers = list(optimizers or OPTIMIZER_NAMES)
    _check_names("block", blocks, list(BLOCKS))
    _check_names("bn", bns, BN_PLACEMENTS)
    _check_names("optimizer", optimizers, OPTIMIZER_NAMES)
    return [
        SuiteCase(block, bn, BY_NAME[opt], applied)
        for block in blocks for bn in bns for opt in optimizers for applied in APPLIED
    ]


def run_case(case: SuiteCase, steps: int, dtype: torch.dtype, device: str, seed: int) -> tuple[dict, pd.DataFrame]:
    """One case: its summary row (:data:`verification.schema.SUMMARY_COLUMNS` first) and its
    per-step deviation curve."""
    result = compare_trajectories(
        case.block_factory(), case.optimizer.factory, steps=steps, dtype=dtype, device=device, seed=seed,
        mode=case.requested_mode, scheduler_factory=case.optimizer.scheduler,
    )
    moved_abs, moved_rel = result.least_movement("sgs")
    row = dict(
        section=SECTION, case=case.name, expected=result.expected["sgs"], observed=result.verdicts["sgs"],
        max_abs_dev=result.max_abs_deviation["sgs"], max_rel_dev=result.max_deviation["sgs"],
        moved_abs=moved_abs, moved_rel=moved_rel, match=result.matches, detail=result.reasons["sgs"],
        block=case.block, bn=case.bn, optimizer=case.optimizer.name, applied=case.applied, sgs_mode=result.sgs_mode,
        merged_expected=result.expected.get("merged", ""), merged_observed=result.verdicts.get("merged", ""),
        merged_max_rel_dev=result.max_deviation.get("merged", float("nan")),
    )
    curves = result.frame[["step", "side", "max_rel"]].rename(columns={"max_rel": "rel_dev"})
    curves.insert(0, "case", case.name)
    curves.insert(0, "section", SECTION)
    return row, curves[[*CURVE_COLUMNS, "side"]]


def iter_sgs_section(
    cases: Sequence[SuiteCase],
    steps: int = DEFAULT_STEPS,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> Iterator[tuple[dict, pd.DataFrame]]:
    """Run the cases one by one, yielding ``(summary row, curve)`` as each finishes (so that an
    interrupted run keeps what finished)."""
    check_steps(steps, "run_sgs_section")  # now, not at the first next()

    def run_all() -> Iterator[tuple[dict, pd.DataFrame]]:
        for case in tqdm(cases, desc="sgs equivalence", unit="case", disable=not progress, leave=False):
            with single_thread():
                yield run_case(case, steps, dtype, device, seed)

    return run_all()


def run_sgs_section(
    cases: Sequence[SuiteCase],
    steps: int = DEFAULT_STEPS,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every case; returns ``(summary, curves)`` frames (one row per case / per step and side)."""
    return frames(iter_sgs_section(cases, steps, dtype, device, seed, progress))

