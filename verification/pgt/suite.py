"""Trajectory-level verification of the PowerGrad Transform.

Each case trains two copies of one small conv net from the same initialisation on the same
batches, one with method A and one with method B, under the same optimizer (SGD with
momentum or Adam), and records after every step the largest per-parameter relative
deviation ``max_k ||theta_A,k - theta_B,k||_inf / ||theta_B,k||_inf``.

Verdict (float64 thresholds; float32 uses 1e-4 / 1e-2): ``"exact"`` if the maximum over steps
is <= 1e-10, ``"diverges"`` if it exceeds 1e-6 (or is not finite), else ``"inconclusive"``,
which never matches an expected verdict.

Because ``p**alpha / sum p**alpha = softmax(alpha z)``, PGT's logit gradient is the gradient
of the surrogate ``CE(alpha z, target) / alpha``; matching every parameter's gradient makes the
two trainings identical under any optimizer, which is what the "exact" cases show.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reparam.pgt import power_grad_cross_entropy, power_grad_logits
from verification.tolerances import (
    QUICK_STEPS,  # steps per case with quick=True, as `reparam verify --quick` says
    classify,
    single_thread,
)

from .reference import reference_reconstruct_from_grad_hook

__all__ = ["run_pgt_section", "SUMMARY_COLUMNS", "CURVE_COLUMNS", "QUICK_STEPS"]

SUMMARY_COLUMNS = ["section", "case", "expected", "observed", "max_abs_dev", "max_rel_dev", "match", "detail"]
CURVE_COLUMNS = ["section", "case", "step", "rel_dev"]

_DTYPES = (torch.float64, torch.float32)
_BATCH = 8
_CLASSES = 5
_NUM_BATCHES = 4
_IGNORE = -100

GradFn = Callable[[nn.Module, Tensor, Tensor], None]


# --------------------------------------------------------------------------- methods
def _backward(model: nn.Module, loss: Tensor, loss_scale: float) -> None:
    """``(S * loss).backward()`` then divide the gradients by ``S`` (what GradScaler does)."""
    if loss.dim() > 0:
        loss = loss.sum()
    (loss * loss_scale).backward()
    if loss_scale != 1.0:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.div_(loss_scale)


def _pgt_loss(alpha: float, loss_scale: float = 1.0, **ce: object) -> GradFn:
    def run(model: nn.Module, x: Tensor, t: Tensor) -> None:
        _backward(model, power_grad_cross_entropy(model(x), t, alpha, **ce), loss_scale)

    return run


def _surrogate(alpha: float, **ce: object) -> GradFn:
    def run(model: nn.Module, x: Tensor, t: Tensor) -> None:
        _backward(model, F.cross_entropy(alpha * model(x), t, **ce) / alpha, 1.0)

    return run


def _plain(**ce: object) -> GradFn:
    def run(model: nn.Module, x: Tensor, t: Tensor) -> None:
        _backward(model, F.cross_entropy(model(x), t, **ce), 1.0)

    return run


def _grad_penalty(loss_fn: Callable[[Tensor, Tensor], Tensor], weight: float = 0.1) -> GradFn:
    """Train on ``loss + weight * ||d loss / d x||^2`` (double backward through the loss)."""

    def run(model: nn.Module, x: Tensor, t: Tensor) -> None:
        x = x.detach().requires_grad_()
        loss = loss_fn(model(x), t)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        _backward(model, loss + weight * gx.pow(2).sum(), 1.0)

    return run


def _pgt_logits(alpha: float, loss_scale: float, explicit_scale: bool = False, **ce: object) -> GradFn:
    def run(model: nn.Module, x: Tensor, t: Tensor) -> None:
        z = model(x)
        # unweighted mean: s = S / (number of non-ignored rows); ignored rows have zero gradient
        scale = loss_scale / int((t != _IGNORE).sum()) if explicit_scale else None
        _backward(model, F.cross_entropy(power_grad_logits(z, alpha, scale=scale), t, **ce), loss_scale)

    return run


def _reference_hook(alpha: float, loss_scale: float) -> GradFn:
    def run(model: nn.Module, x: Tensor, t: Tensor) -> None:
        z = model(x)
        reference_reconstruct_from_grad_hook(z, t, alpha)
        _backward(model, F.cross_entropy(z, t), loss_scale)

    return run


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class _Case:
    name: str
    expected: str
    method_a: GradFn
    method_b: GradFn
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


def _deviation(model_a: nn.Module, model_b: nn.Module) -> tuple[float, float]:
    worst_abs, worst_rel = 0.0, 0.0
    with torch.no_grad():
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            d = float((pa - pb).abs().max())
            ref = float(pb.abs().max())
            if not (math.isfinite(d) and math.isfinite(ref)):
                return math.inf, math.inf
            worst_abs = max(worst_abs, d)
            worst_rel = max(worst_rel, d / max(ref, 1e-300))
    return worst_abs, worst_rel


def _run_case(
    case: _Case, base: nn.Module, batches: list[tuple[Tensor, Tensor]], steps: int
) -> tuple[float, float, list[float]]:
    model_a, model_b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a, opt_b = _optimizer(case.optimizer, model_a), _optimizer(case.optimizer, model_b)
    curve: list[float] = []
    max_abs = max_rel = 0.0
    for step in range(steps):
        x, t = batches[step % len(batches)]
        for model, opt, method in ((model_a, opt_a, case.method_a), (model_b, opt_b, case.method_b)):
            opt.zero_grad(set_to_none=True)
            method(model, x, t)
            opt.step()
        d_abs, d_rel = _deviation(model_a, model_b)
        curve.append(d_rel)
        max_abs, max_rel = max(max_abs, d_abs), max(max_rel, d_rel)
    return max_abs, max_rel, curve


def run_pgt_section(
    steps: int = 20,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    quick: bool = False,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every PGT case and return ``(summary, curves)``.

    ``summary``: one row per case, columns ``section, case, expected, observed, max_abs_dev,
    max_rel_dev, match, detail``.  ``curves``: ``section, case, step, rel_dev`` per step.
    ``quick`` caps the trajectory at :data:`QUICK_STEPS` (8) steps, the number
    ``reparam verify --quick`` advertises.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if quick:
        steps = min(steps, QUICK_STEPS)
    dev = torch.device(device)
    base = _make_model(dtype, dev, seed)
    data = _make_data(dtype, dev, seed)
    weight = torch.linspace(0.5, 2.0, _CLASSES, dtype=dtype, device=dev)
    cases = _cases(weight)

    iterator: object = cases
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(cases, desc="pgt", unit="case")

    rows: list[dict[str, object]] = []
    curves: list[dict[str, object]] = []
    for case in iterator:  # type: ignore[union-attr]
        with single_thread():
            max_abs, max_rel, curve = _run_case(case, base, data[case.targets], steps)
        observed = classify(max_rel, dtype, approximation=False)
        opt_name = "SGD momentum" if case.optimizer == "sgdm" else "Adam"
        rows.append(
            {
                "section": "pgt",
                "case": case.name,
                "expected": case.expected,
                "observed": observed,
                "max_abs_dev": max_abs,
                "max_rel_dev": max_rel,
                "match": observed == case.expected,
                "detail": f"{case.detail}; {opt_name}, {steps} steps",
            }
        )
        curves.extend(
            {"section": "pgt", "case": case.name, "step": i + 1, "rel_dev": v} for i, v in enumerate(curve)
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS), pd.DataFrame(curves, columns=CURVE_COLUMNS)
