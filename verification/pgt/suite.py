"""Trajectory-level verification of the PowerGrad Transform.

Each case trains two copies of one small conv net from the same initialisation on the same
batches (:func:`verification.lockstep.run_lockstep`), one with method A and one with method B,
under the same optimizer (SGD with momentum or Adam), and records after every step the largest
per-parameter relative deviation ``max_k ||theta_A,k - theta_B,k||_inf / ||theta_B,k||_inf``
(:func:`verification.lockstep.deviation`, ``per_tensor=True``) and how far each copy moved.

Verdicts follow :func:`verification.tolerances.classify` (thresholds ``EXACT_TOL`` and
``DIVERGENCE_FLOOR`` for the dtype; a non-finite deviation diverges; an "exact" trajectory must
have moved ``min_movement``), ``"inconclusive"`` never matches an expected verdict.

Because ``p**alpha / sum p**alpha = softmax(alpha z)``, PGT's logit gradient is the gradient
of the surrogate ``CE(alpha z, target) / alpha``; matching every parameter's gradient makes the
two trainings identical under any optimizer, which is what the "exact" cases show.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from reparam.pgt import power_grad_cross_entropy, power_grad_logits
from verification.lockstep import LossFn, Side, deviation, movement, run_lockstep, snapshot, worst
from verification.schema import CURVE_COLUMNS, SUMMARY_COLUMNS, frames
from verification.tolerances import (
    DEFAULT_STEPS,
    QUICK_STEPS,  # steps per case with quick=True, as `reparam verify --quick` says
    check_steps,
    classify,
    single_thread,
)

from .reference import reference_reconstruct_from_grad_hook

__all__ = ["run_pgt_section", "iter_pgt_section", "SUMMARY_COLUMNS", "CURVE_COLUMNS", "QUICK_STEPS"]

SECTION = "pgt"

_DTYPES = (torch.float64, torch.float32)
_BATCH = 8
_CLASSES = 5
_NUM_BATCHES = 4
_IGNORE = -100



@dataclass(frozen=True)
class Method:
    """How one copy computes its gradient: ``loss_fn(model, (x, t))``, backpropagated at loss
    scale ``loss_scale`` and unscaled before the step (what GradScaler does)."""

    loss_fn: LossFn
    loss_scale: float = 1.0


# --------------------------------------------------------------------------- methods
def _pgt_loss(alpha: float, loss_scale: float = 1.0, **ce: object) -> Method:
    return Method(lambda model, batch: power_grad_cross_entropy(model(batch[0]), batch[1], alpha, **ce), loss_scale)


def _surrogate(alpha: float, **ce: object) -> Method:
    return Method(lambda model, batch: F.cross_entropy(alpha * model(batch[0]), batch[1], **ce) / alpha)


def _plain(**ce: object) -> Method:
    return Method(lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], **ce))


def _grad_penalty(loss_fn: Callable[[Tensor, Tensor], Tensor], weight: float = 0.1) -> Method:
    """Train on ``loss + weight * ||d loss / d x||^2`` (double backward through the loss)."""

    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x = batch[0].detach().requires_grad_()
        value = loss_fn(model(x), batch[1])
        (gx,) = torch.autograd.grad(value, x, create_graph=True)
        return value + weight * gx.pow(2).sum()

    return Method(loss)


def _pgt_logits(alpha: float, loss_scale: float, explicit_scale: bool = False, **ce: object) -> Method:
    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, t = batch
        # unweighted mean: s = S / (number of non-ignored rows); ignored rows have zero gradient
        scale = loss_scale / int((t != _IGNORE).sum()) if explicit_scale else None
        return F.cross_entropy(power_grad_logits(model(x), alpha, scale=scale), t, **ce)

    return Method(loss, loss_scale)


def _reference_hook(alpha: float, loss_scale: float) -> Method:
    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        z = model(batch[0])
        reference_reconstruct_from_grad_hook(z, batch[1], alpha)
        return F.cross_entropy(z, batch[1])

    return Method(loss, loss_scale)


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class _Case:
    name: str
    expected: str
    method_a: Method
    method_b: Method
    optimizer: str  # "sgdm" | "adam"
    targets: str  # "hard" | "ignore" | "soft"
    detail: str


def _cases(weight: Tensor) -> list[_Case]:
    b2 = float(_BATCH**2)
    sur = "vs surrogate CE(a z)/a"
    return [
        _Case("loss-a0.25-sgdm", "exact", _pgt_loss(0.25), _surrogate(0.25), "sgdm", "hard", f"PGT loss a=0.25 {sur}"),
        _Case("loss-a0.5-adam", "exact", _pgt_loss(0.5), _surrogate(0.5), "adam", "hard", f"PGT loss a=0.5 {sur}"),
        _Case("loss-a0.05-adam", "exact", _pgt_loss(0.05), _surrogate(0.05), "adam", "hard", f"PGT loss a=0.05 {sur}"),
        _Case("loss-smooth0.1-a0.3", "exact", _pgt_loss(0.3, label_smoothing=0.1),
              _surrogate(0.3, label_smoothing=0.1), "sgdm", "hard", f"label smoothing 0.1 {sur}"),
        _Case("loss-weight-a0.25", "exact", _pgt_loss(0.25, weight=weight), _surrogate(0.25, weight=weight),
              "adam", "hard", f"class weights {sur}"),
        _Case("loss-ignore-a0.25", "exact", _pgt_loss(0.25), _surrogate(0.25), "sgdm", "ignore",
              f"ignore_index=-100 on 3/8 rows {sur}"),
        _Case("loss-all-options-a0.3", "exact",
              _pgt_loss(0.3, weight=weight, label_smoothing=0.2),
              _surrogate(0.3, weight=weight, label_smoothing=0.2), "adam", "ignore",
              f"weights + smoothing 0.2 + ignore_index {sur}"),
        _Case("loss-soft-a0.25", "exact", _pgt_loss(0.25, weight=weight), _surrogate(0.25, weight=weight),
              "sgdm", "soft", f"soft targets + weights {sur}"),
        _Case("loss-sum-a0.25", "exact", _pgt_loss(0.25, reduction="sum"), _surrogate(0.25, reduction="sum"),
              "adam", "hard", f"reduction=sum {sur}"),
        _Case("loss-scale1024-a0.25", "exact", _pgt_loss(0.25, loss_scale=1024.0), _surrogate(0.25),
              "sgdm", "hard", f"loss scale 1024 (GradScaler) {sur}"),
        _Case("loss-scale2^18-a0.25", "exact", _pgt_loss(0.25, loss_scale=2.0**18, weight=weight),
              _surrogate(0.25, weight=weight), "adam", "ignore", f"loss scale 2^18 + weights {sur}"),
        _Case("loss-a1-vs-ce", "exact", _pgt_loss(1.0, label_smoothing=0.1), _plain(label_smoothing=0.1),
              "sgdm", "hard", "PGT a=1 vs plain CE (smoothing 0.1)"),
        _Case("logits-auto-a0.25", "exact", _pgt_logits(0.25, loss_scale=1000.0, weight=weight),
              _surrogate(0.25, weight=weight), "sgdm", "ignore",
              f"logits transform, scale recovered; loss scale 1000, weights, ignore {sur}"),
        _Case("logits-auto-a0.5-adam", "exact", _pgt_logits(0.5, loss_scale=1.0), _surrogate(0.5), "adam", "hard",
              f"logits transform, scale recovered {sur}"),
        _Case("logits-explicit-smooth-a0.3", "exact",
              _pgt_logits(0.3, loss_scale=512.0, explicit_scale=True, label_smoothing=0.1),
              _surrogate(0.3, label_smoothing=0.1), "adam", "hard",
              f"logits transform, scale=S/B given; smoothing 0.1, loss scale 512 {sur}"),
        _Case("logits-explicit-ignore-a0.3", "exact",
              _pgt_logits(0.3, loss_scale=64.0, explicit_scale=True, label_smoothing=0.1),
              _surrogate(0.3, label_smoothing=0.1), "sgdm", "ignore",
              f"logits transform, scale=S/(non-ignored rows); smoothing 0.1, ignore_index {sur}"),
        _Case("loss-gradpenalty-a0.3", "exact",
              _grad_penalty(lambda z, t: power_grad_cross_entropy(z, t, 0.3)),
              _grad_penalty(lambda z, t: F.cross_entropy(0.3 * z, t) / 0.3), "adam", "hard",
              f"input-gradient penalty (double backward) {sur}"),
        _Case("neg-pgt-a0.25-vs-ce", "diverges", _pgt_loss(0.25), _plain(), "sgdm", "hard",
              "PGT a=0.25 vs plain CE (must differ)"),
        _Case("neg-reference-hook-S1", "diverges", _reference_hook(0.25, 1.0), _surrogate(0.25), "sgdm", "hard",
              f"reference p=grad/B+q hook, loss scale 1 != B^2 {sur}"),
        _Case("neg-reference-hook-S4B2", "diverges", _reference_hook(0.25, 4.0 * b2), _surrogate(0.25), "sgdm",
              "hard", f"reference hook, loss scale 4B^2 (NaN) {sur}"),
        _Case("sanity-reference-hook-SB2", "exact", _reference_hook(0.25, b2), _surrogate(0.25), "sgdm", "hard",
              f"reference hook, loss scale exactly B^2={int(b2)} {sur}"),
    ]


# --------------------------------------------------------------------------- harness
def _make_model(dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, 12),
            nn.Tanh(),
            nn.Linear(12, _CLASSES),
        )
    return model.to(device=device, dtype=dtype)


def _make_data(dtype: torch.dtype, device: torch.device, seed: int) -> dict[str, list[tuple[Tensor, Tensor]]]:
    gen = torch.Generator().manual_seed(seed + 1)
    data: dict[str, list[tuple[Tensor, Tensor]]] = {"hard": [], "ignore": [], "soft": []}
    for _ in range(_NUM_BATCHES):
        x = (2.0 * torch.randn(_BATCH, 1, 6, 6, generator=gen, dtype=torch.float64)).to(device, dtype)
        y = torch.randint(0, _CLASSES, (_BATCH,), generator=gen)
        ignored = y.clone()
        ignored[torch.randperm(_BATCH, generator=gen)[:3]] = _IGNORE
        soft = torch.softmax(2.0 * torch.randn(_BATCH, _CLASSES, generator=gen, dtype=torch.float64), dim=1)
        data["hard"].append((x, y.to(device)))
        data["ignore"].append((x, ignored.to(device)))
        data["soft"].append((x, soft.to(device, dtype)))
    return data


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgdm":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _run_case(case: _Case, base: nn.Module, batches: list[tuple[Tensor, Tensor]], steps: int) -> list[dict]:
    """One row per step: ``abs``/``rel`` deviation of copy A from copy B, and ``moved_abs`` /
    ``moved_rel``, the movement from the start of the copy that moved less."""
    sides = []
    for name, method in (("a", case.method_a), ("b", case.method_b)):
        model = copy.deepcopy(base)
        sides.append(Side(name, model, _optimizer(case.optimizer, model), loss_fn=method.loss_fn,
                          loss_scale=method.loss_scale))
    start = snapshot(base.parameters())
    model_a, model_b = sides[0].model, sides[1].model

    def observe(step: int) -> dict:
        d_abs, d_rel = deviation(list(model_b.parameters()), list(model_a.parameters()), per_tensor=True)
        moved = min((movement(start, list(m.parameters())) for m in (model_a, model_b)), key=lambda m: (m[1], m[0]))
        return {"abs": d_abs, "rel": d_rel, "moved_abs": moved[0], "moved_rel": moved[1]}

    return run_lockstep(sides, batches, None, steps, observe)


def _summary_row(case: _Case, rows: list[dict], dtype: torch.dtype, steps: int) -> dict:
    max_rel = worst(r["rel"] for r in rows)
    moved_abs, moved_rel = worst(r["moved_abs"] for r in rows), worst(r["moved_rel"] for r in rows)
    observed = classify(max_rel, dtype, approximation=False, moved=moved_rel)
    opt_name = "SGD momentum" if case.optimizer == "sgdm" else "Adam"
    return dict(
        section=SECTION, case=case.name, expected=case.expected, observed=observed,
        max_abs_dev=worst(r["abs"] for r in rows), max_rel_dev=max_rel, moved_abs=moved_abs, moved_rel=moved_rel,
        match=observed == case.expected, detail=f"{case.detail}; {opt_name}, {steps} steps",
    )


def iter_pgt_section(
    steps: int = DEFAULT_STEPS,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    quick: bool = False,
    progress: bool = False,
) -> Iterator[tuple[dict, pd.DataFrame]]:
    """:func:`run_pgt_section` one case at a time: yields ``(summary row, curve)`` as each finishes."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    check_steps(steps, "run_pgt_section")
    if quick:
        steps = min(steps, QUICK_STEPS)
    dev = torch.device(device)
    base = _make_model(dtype, dev, seed)
    data = _make_data(dtype, dev, seed)
    cases = _cases(torch.linspace(0.5, 2.0, _CLASSES, dtype=dtype, device=dev))

    def run_all() -> Iterator[tuple[dict, pd.DataFrame]]:
        for case in tqdm(cases, desc="pgt", unit="case", disable=not progress, leave=False):
            with single_thread():
                rows = _run_case(case, base, data[case.targets], steps)
            curve = pd.DataFrame({"section": SECTION, "case": case.name, "step": [r["step"] for r in rows],
                                  "rel_dev": [r["rel"] for r in rows]}, columns=CURVE_COLUMNS)
            yield _summary_row(case, rows, dtype, steps), curve

    return run_all()


def run_pgt_section(
    steps: int = DEFAULT_STEPS,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    quick: bool = False,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every PGT case and return ``(summary, curves)``.

    ``summary``: one row per case, columns :data:`verification.schema.SUMMARY_COLUMNS`.
    ``curves``: :data:`verification.schema.CURVE_COLUMNS`, one row per step. ``quick`` caps the
    trajectory at :data:`QUICK_STEPS` steps, the number ``reparam verify --quick`` advertises.
    """
    summary, curves = frames(iter_pgt_section(steps, dtype, device, seed, quick, progress))
    return summary[SUMMARY_COLUMNS], curves
