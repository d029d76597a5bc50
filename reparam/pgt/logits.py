r"""PowerGrad Transform as an identity on the logits (for code whose loss cannot change).

``power_grad_logits(z, alpha)`` returns ``z`` unchanged; its backward rewrites the gradient
that a *downstream softmax cross-entropy on these very logits* sends back.

Assumption (A): row ``n`` of the incoming gradient has the form

.. math::  g_n = s_n \, (p_n - q_n), \qquad p_n = \mathrm{softmax}(z_n),\; q_n \ge 0,\; \textstyle\sum_c q_{nc} = 1,

with an unknown per-row scale ``s_n >= 0`` (loss scale x reduction factor x class weight).
This holds for ``F.cross_entropy(z, target, weight=..., ignore_index=..., reduction=...,
label_smoothing=...)`` applied directly to ``z``, with any loss scale (GradScaler).

The PGT gradient is ``s_n (softmax(alpha z_n) - q_n) = g_n + s_n (softmax(alpha z_n) - p_n)``:
``p`` is recomputable from the saved logits, ``q`` is not needed, only ``s_n``.
``s_n`` is *not* identifiable from ``g_n`` alone in general (``sum_c g_nc = 0`` for every
``s_n``), so it is obtained in one of two ways:

* ``scale=None`` (automatic) additionally assumes **hard targets**, ``q_n`` one-hot at ``y_n``
  (no label smoothing, no soft targets).  Then ``g_nc = s_n p_nc`` for ``c != y_n`` and
  ``g_{n,y_n} < 0``, so ``y_n = argmin_c g_nc`` and
  ``s_n = sum_{c != y_n} g_nc / sum_{c != y_n} p_nc`` (a ratio of same-sign terms, free of the
  cancellation in ``1 - p_y``).  The loss scale never has to be known.  Rows whose gradient is
  exactly zero (ignored rows) get ``s_n = 0`` and stay zero.
* ``scale=s`` (a float or a ``(N,)`` tensor) gives ``s_n`` explicitly, e.g. ``S / N`` for an
  unweighted mean-reduced loss multiplied by ``S``.  Then any normalised ``q`` works (label
  smoothing, soft targets).

With ``check=True`` (default) the backward verifies what it can and raises
:class:`reparam.errors.PGTAssumptionError` otherwise: automatic mode checks that
``|g_n - s_n (p_n - e_{y_n})| <= rtol * |s_n|`` entry-wise (the one-hot model fits) and that
the scale is recoverable (some non-target probability is non-zero); explicit mode checks
``|sum_c g_nc| <= rtol * |s_n|`` and ``s_n p_n - g_n >= -rtol * |s_n|`` (i.e. ``q_n`` is a
distribution).  ``rtol`` defaults to 1e-10 (float64), 1e-4 (float32), 5e-3 (float16) and
3e-2 (bfloat16) for the incoming gradient's dtype.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from reparam.errors import PGTAssumptionError

from ._common import autocast_disabled, check_alpha, compute_dtype

__all__ = ["PowerGradLogits", "power_grad_logits"]

_DEFAULT_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

ScaleLike = Union[float, Tensor, None]


def _recover_hard_scale(g: Tensor, p: Tensor, check: bool, rtol: float) -> Tensor:
    """Per-row ``s`` under assumption (A) with one-hot ``q`` (see the module docstring)."""
    y = g.argmin(dim=1)
    onehot = F.one_hot(y, g.shape[1]).to(g.dtype)
    off = 1.0 - onehot
    num = (g * off).sum(dim=1)
    den = (p * off).sum(dim=1)
    zero_row = (g == 0).all(dim=1)
    bad = ~zero_row & ~(den > 0)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise PGTAssumptionError(
            f"power_grad_logits: cannot recover the per-row loss scale for rows {rows}: the "
            "softmax of the logits puts all mass on one class (non-target probabilities "
            "underflow to 0) while the incoming gradient is non-zero; pass scale= explicitly"
        )
    s = torch.where(zero_row, torch.zeros_like(num), num / torch.where(den > 0, den, torch.ones_like(den)))
    if check:
        resid = (g - s[:, None] * (p - onehot)).abs().amax(dim=1)
        fails = ~zero_row & ~(resid <= rtol * s.abs())
        if bool(fails.any()):
            n = int(fails.nonzero()[0, 0])
            raise PGTAssumptionError(
                "power_grad_logits(scale=None) assumes the logits feed a softmax cross-entropy with "
                f"hard (one-hot) targets and a positive scale; row {n} does not fit that form "
                f"(residual {float(resid[n]):.3g} > rtol {rtol:g} x |scale| {float(s[n].abs()):.3g}). "
                "With label smoothing or soft targets pass scale= explicitly."
            )
    return s


def _explicit_scale(scale: Tensor, g: Tensor, p: Tensor, check: bool, rtol: float) -> Tensor:
    """Broadcast a user scale to ``(N,)`` and check assumption (A) as far as possible."""
    s = scale.to(device=g.device, dtype=g.dtype).reshape(-1)
    if s.numel() == 1:
        s = s.expand(g.shape[0])
    elif s.numel() != g.shape[0]:
        raise ValueError(
            f"scale must be a scalar or have one entry per row ({g.shape[0]}), got {tuple(scale.shape)}"
        )
    if check:
        tol = rtol * s.abs()
        row_sum = g.sum(dim=1).abs()
        mass = s[:, None] * p - g  # = s q
        if bool((row_sum > tol).any()) or bool((mass < -tol[:, None]).any()):
            raise PGTAssumptionError(
                "power_grad_logits: the incoming gradient is not s * (softmax(logits) - q) for the "
                "given scale and a probability vector q (rows must sum to 0 and s * p - g must be "
                "non-negative); check scale= and that the loss is softmax cross-entropy on these logits"
            )
    return s


class _PowerGradLogitsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, alpha: float, scale: Optional[Tensor], check: bool, rtol: Optional[float]):  # type: ignore[override]
        ctx.alpha = alpha
        ctx.check = check
        ctx.rtol = rtol
        ctx.has_scale = scale is not None
        if scale is None:
            ctx.save_for_backward(logits)
        else:
            ctx.save_for_backward(logits, scale)
        return logits.view_as(logits)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.alpha == 1.0:
            return grad, None, None, None, None
        saved = ctx.saved_tensors
        logits = saved[0]
        cdtype = compute_dtype(logits.dtype)
        rtol = ctx.rtol if ctx.rtol is not None else _DEFAULT_RTOL.get(grad.dtype, 1e-4)
        with autocast_disabled(logits.device.type):
            z = logits.to(cdtype)
            g = grad.to(cdtype)
            p = torch.softmax(z, dim=1)
            if ctx.has_scale:
                s = _explicit_scale(saved[1], g, p, ctx.check, rtol)
            else:
                s = _recover_hard_scale(g, p, ctx.check, rtol)
            out = g + s[:, None] * (torch.softmax(z * ctx.alpha, dim=1) - p)
        return out.to(grad.dtype), None, None, None, None


def power_grad_logits(
    logits: Tensor,
    alpha: float,
    scale: ScaleLike = None,
    check: bool = True,
    rtol: Optional[float] = None,
) -> Tensor:
    """Identity on ``logits`` (shape ``(N, C)``) whose backward applies the PowerGrad Transform
    to the gradient of a downstream softmax cross-entropy.

    Backward: ``g -> g + s * (softmax(alpha * logits) - softmax(logits))`` per row, which turns
    ``s * (p - q)`` into ``s * (softmax(alpha * logits) - q)``.  ``s`` is recovered from ``g``
    under the hard-target assumption when ``scale is None`` (independent of any loss scale),
    or taken from ``scale`` (scalar or ``(N,)``).  See the module docstring for the exact
    assumptions and checks; violations raise :class:`reparam.errors.PGTAssumptionError`.
    ``alpha = 1`` returns the incoming gradient unchanged.

    Raises ``ValueError`` for ``alpha`` outside ``[0, 1]``, logits that are not a 2-D
    floating-point tensor, or a negative / non-finite ``scale``.
    """
    alpha = check_alpha(alpha)
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point torch.Tensor")
    if logits.dim() != 2:
        raise PGTAssumptionError(
            f"power_grad_logits expects logits of shape (N, C) (class dimension last), got shape "
            f"{tuple(logits.shape)}; reshape e.g. (N, C, H, W) -> (N*H*W, C) first"
        )
    scale_t: Optional[Tensor] = None
    if scale is not None:
        scale_t = torch.as_tensor(scale, dtype=compute_dtype(logits.dtype), device=logits.device).detach()
        if not bool(torch.isfinite(scale_t).all()) or bool((scale_t < 0).any()):
            raise ValueError(f"scale must be finite and non-negative, got {scale!r}")
        if scale_t.numel() not in (1, logits.shape[0]):
            raise ValueError(
                f"scale must be a scalar or have one entry per row ({logits.shape[0]}), "
                f"got shape {tuple(scale_t.shape)}"
            )
    if rtol is not None and not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol!r}")
    return _PowerGradLogitsFn.apply(logits, alpha, scale_t, bool(check), rtol)


class PowerGradLogits(nn.Module):
    """Module form of :func:`power_grad_logits` with automatic (hard-target) scale recovery;
    insert it right after the layer that produces the logits."""

    def __init__(self, alpha: float, check: bool = True, rtol: Optional[float] = None) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.check = check
        self.rtol = rtol

    def forward(self, logits: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not logits.requires_grad:
            return logits
        return power_grad_logits(logits, self.alpha, check=self.check, rtol=self.rtol)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
