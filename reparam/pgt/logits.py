r"""PowerGrad Transform as an identity on the logits (for code whose loss cannot change).

``power_grad_logits(z, alpha)`` returns ``z`` unchanged; its backward rewrites the gradient
that a *downstream softmax cross-entropy on these very logits* sends back.  Prefer
:func:`reparam.pgt.power_grad_cross_entropy` where the loss can change: it needs no assumption
and no check, is exact at any precision and supports double backward.

Assumption (A): row ``n`` of the incoming gradient has the form

.. math::  g_n = s_n \, (p_n - q_n), \qquad p_n = \mathrm{softmax}(z_n),\; q_n \ge 0,\; \textstyle\sum_c q_{nc} = 1,

with a per-row scale ``s_n >= 0`` (loss scale x reduction factor x class weight).  This holds
for ``F.cross_entropy(z, target, weight=..., ignore_index=..., reduction=...,
label_smoothing=...)`` applied directly to ``z``, with any loss scale (GradScaler).

The PGT gradient is ``s_n (p'_n - q_n) = g_n + s_n (p'_n - p_n)`` with ``p' = softmax(alpha z)``
(its ``alpha -> 0+`` limit at ``alpha = 0``): ``p`` and ``p'`` come from the saved logits, ``q``
is not needed, only ``s_n``.  ``s_n`` is not identifiable from ``g_n`` alone in general
(``sum_c g_nc = 0`` for every ``s_n``), so it is obtained in one of two ways.

``scale=None`` (automatic) additionally assumes **hard targets**: ``q_n = e_{y_n}`` one-hot, so
``g_n = s_n (p_n - e_{y_n})``.  Any loss of the form ``l(p_y)`` (a function of the true-class
probability only) has this gradient, e.g. focal loss, with ``s_n = -l'(p_y) p_y``; the result is
then ``s_n (p'_n - e_{y_n})``: the loss's own per-row weight is kept and ``p`` is replaced by
``p'`` (for focal loss: the focal weighting of the *untransformed* prediction, PGT direction).

* ``y_n = argmin_c g_nc / p_nc`` (= ``s`` off target, ``< s`` at the target; ties, e.g. a target
  gradient rounded to 0 next to a masked class, go to the larger ``p``).
* With ``m = sum_{c != y} p_c`` (no cancellation), two estimates: ``s_y = -g_y / m`` from the
  target entry (the largest, last to underflow, but the loss computed ``p_y - 1`` with
  cancellation) and ``s_o = sum_{c != y} g_c / m`` from the others (accurate relative entries,
  but the first to underflow).  With ``u``, ``tiny`` and ``eta`` the unit roundoff, smallest
  normal and smallest subnormal of the gradient's dtype, ``eps_c`` the machine epsilon of the
  dtype the loss evaluated its softmax in (float32, or float64 for float64 logits), and
  ``r_c = eta / 2`` for an entry below ``tiny`` (else ``u |g_c|``) its rounding error, the
  worst-case uncertainties are ``d_y = (eps_c s + r_y) / m`` and ``d_o = sum_{c != y} r_c / m``;
  the estimate with the smaller one, ``ds``, is used.

Tolerance ``rtol``: 1e-10 (float64), 1e-4 (float32), 5e-3 (float16), 3e-2 (bfloat16), by the
incoming gradient's dtype, or given.  With ``check=True`` (default) automatic mode returns a row
only if

1. the scale is precise enough: ``ds * max(m', m) <= rtol * s`` with ``m' = sum_{c != y} p'_c``
   ``= ||p' - e_y||_inf``.  Then, for a hard-label cross-entropy gradient evaluated in
   float32/float64 and rounded to its dtype, **the returned row is within ``rtol * s`` of
   ``s (p' - e_y)`` entry-wise**, beyond the rounding already in ``g`` and of the result;
2. every entry fits the model to within ``rtol`` relative: ``|g_c - s d_c| <= (rtol s + ds)
   |d_c| + 4 r_c + s eta_c + [c = y] eps_c s`` with ``d = p - e_y`` (``eta_c``: smallest subnormal
   of the softmax's dtype).  Deviations within that pass into the result.

It raises :class:`reparam.errors.PGTAssumptionError` otherwise, saying whether the gradient
does not have the hard-target form (label smoothing, soft targets, another loss: pass
``scale=``) or is too imprecise for the scale (float16 near underflow: use the loss form or a
larger loss scale; with GradScaler's usual 2**16 margins up to about 14 are fine).  A
cross-entropy evaluated natively in float16/bfloat16 has entry errors of order
``|log p| eps_16`` and may be rejected: evaluate it in float32 (autocast does).  With
``check=False`` nothing is verified.

``scale=s`` (a float or an ``(N,)`` tensor) gives ``s_n`` explicitly: ``S / (number of
non-ignored rows)`` for an unweighted mean-reduced loss multiplied by ``S``,
``S w_{y_n} / sum_m w_{y_m}`` (sum over non-ignored rows) with class weights, ``S`` for
``reduction="sum"``.  Any normalised ``q`` works (label smoothing, soft targets).  The row's
implied target ``q = p - g / s`` is recovered and, with ``check=True``, must be a distribution
to within ``rtol``: ``q_c >= -rtol - eta / s`` and ``|sum_c q_c - 1| <= rtol + C eta / s``; the result is then
exactly ``s (p' - q)``.  Not detectable, hence not checked: a scale larger than the true one
(``q`` becomes the mixture ``p + (e_y - p) s_true / s``, still a distribution) and any other
loss whose gradient sums to zero over classes and is small next to ``s p`` (e.g. MSE on the
softmax): those return ``s (p' - q)`` for the implied ``q``.

Both modes:

* a row with a non-finite entry (GradScaler overflow) passes through untouched, so the scaler
  can skip the step;
* a row that is exactly zero is weightless (``ignore_index``, zero class weight, zero per-row
  scale) and stays zero.  A zero row is ambiguous when the prediction is so confident that a
  hard-label gradient at the reference scale (the given ``s_n``; automatic mode: the largest
  scale recovered in the batch, at least ``1/N``, an unscaled mean-reduced loss) underflows in
  the gradient's dtype while its PGT gradient would not: with ``check=True`` that raises,
  recommending the loss form or a per-row ``scale=`` with 0 on ignored rows;
* double backward is not supported (the scale recovery is not differentiable): differentiating
  the transformed gradient raises a ``RuntimeError`` pointing to the loss form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reparam.errors import PGTAssumptionError

from ._common import AlphaLike, autocast_disabled, check_alpha, compute_dtype, scaled_softmax

__all__ = ["PowerGradLogits", "power_grad_logits"]

_DEFAULT_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

ScaleLike = Union[float, Tensor, None]

#: roundings of the incoming gradient the fit check allows per entry (the loss's own plus ours)
_ROUNDINGS = 4


@dataclass(frozen=True)
class _Precision:
    """The incoming gradient's dtype with its unit roundoff ``u``, smallest normal and smallest
    subnormal; the machine epsilon and smallest subnormal of the compute dtype (float32 or
    float64, in which the loss is assumed to have evaluated its softmax); the tolerance."""

    dtype: torch.dtype
    u: float
    tiny: float
    eta: float
    eps_c: float
    eta_c: float
    rtol: float

    @staticmethod
    def of(grad_dtype: torch.dtype, prob_dtype: torch.dtype, rtol: float | None) -> _Precision:
        fg, fp = torch.finfo(grad_dtype), torch.finfo(prob_dtype)
        return _Precision(
            dtype=grad_dtype,
            u=fg.eps / 2,
            tiny=fg.tiny,
            eta=fg.tiny * fg.eps,
            eps_c=fp.eps,
            eta_c=fp.tiny * fp.eps,
            rtol=rtol if rtol is not None else _DEFAULT_RTOL.get(grad_dtype, 1e-4),
        )


def _first(rows: Tensor) -> int:
    return int(rows.nonzero()[0, 0])


def _hard_target(g: Tensor, p: Tensor) -> Tensor:
    """``y_n = argmin_c g_nc / p_nc``; a class with ``p = 0`` counts as ``-inf`` if its gradient is
    negative (target on a masked class), else ``+inf``; ties go to the larger ``p``."""
    masked = torch.where(g < 0, -torch.inf, torch.inf)
    ratio = torch.where(p > 0, g / torch.where(p > 0, p, torch.ones_like(p)), masked)
    tied = ratio == ratio.amin(dim=1, keepdim=True)
    return torch.where(tied, p, torch.full_like(p, -1.0)).argmax(dim=1)


def _off_target_mass(p: Tensor, onehot: Tensor) -> Tensor:
    """``1 - p_y`` computed as ``sum_{c != y} p_c`` (no cancellation)."""
    return (p * (1.0 - onehot)).sum(dim=1)


def _recover_scale(g: Tensor, p: Tensor, p_alpha: Tensor, live: Tensor, prec: _Precision, check: bool) -> Tensor:
    """Per-row ``s`` under (A) with one-hot ``q`` (automatic mode, see the module docstring);
    rows not ``live`` (zero or non-finite) get 0."""
    y = _hard_target(g, p)
    onehot = F.one_hot(y, g.shape[1]).to(g.dtype)
    off = 1.0 - onehot
    m = _off_target_mass(p, onehot)
    m_safe = torch.where(m > 0, m, torch.ones_like(m))
    g_y = (g * onehot).sum(dim=1)
    s_y = -g_y / m_safe
    s_o = (g * off).sum(dim=1) / m_safe
    s_big = torch.maximum(s_y.abs(), s_o.abs())
    # rounding error of each entry: u |g_c|, or eta / 2 below the smallest normal (underflow)
    rounding = torch.where((g.abs() < prec.tiny) & ((p > 0) | (onehot > 0)), prec.eta / 2, prec.u * g.abs())
    d_y = (prec.eps_c * s_big + (rounding * onehot).sum(dim=1)) / m_safe
    d_o = (rounding * off).sum(dim=1) / m_safe
    use_y = d_y <= d_o
    s = torch.where(use_y, s_y, s_o)
    ds = torch.where(use_y, d_y, d_o)
    s = torch.where(live & (m > 0), s, torch.zeros_like(s))
    if not check:
        return s.clamp_min(0.0)
    # |s - s_true| moves the result by at most ds * ||p' - p||_inf <= ds * max(m', m), where
    # m' = sum_{c != y} p'_c = ||p' - e_y||_inf: it must stay within rtol * s
    spread = torch.maximum(_off_target_mass(p_alpha, onehot), m)
    undetermined = live & ~((m > 0) & (ds * spread <= prec.rtol * s.abs()))
    d = p - onehot
    allowed = (
        (prec.rtol * s + ds)[:, None] * d.abs()
        + _ROUNDINGS * rounding
        + (s * prec.eta_c)[:, None]
        + prec.eps_c * s[:, None] * onehot
    )
    misfit = live & ~undetermined & ((s <= 0) | ((g - s[:, None] * d).abs() > allowed).any(dim=1))
    if bool(misfit.any()):
        n = _first(misfit)
        excess = float(((g[n] - s[n] * d[n]).abs() - allowed[n]).max())
        raise PGTAssumptionError(
            "power_grad_logits(scale=None) assumes the logits feed a softmax cross-entropy with hard "
            f"(one-hot) targets and a positive per-row scale; row {n} does not fit s * (softmax(z) - "
            f"onehot(y)) with y={int(y[n])}, s={float(s[n]):.3g} (an entry is off by {excess:.3g} more "
            f"than rtol={prec.rtol:g} allows).  With label smoothing or soft targets pass scale= "
            "explicitly; for other losses use power_grad_cross_entropy or no PGT.  (A cross-entropy "
            "evaluated natively in float16/bfloat16 is also too imprecise: evaluate it in float32, "
            "e.g. under autocast.)"
        )
    if bool(undetermined.any()):
        n = _first(undetermined)
        rel = float(ds[n] / s[n]) if float(s[n]) > 0 else float("inf")
        raise PGTAssumptionError(
            f"power_grad_logits(scale=None): the per-row scale of row {n} cannot be recovered to "
            f"rtol={prec.rtol:g} from its {prec.dtype} gradient "
            f"(recovered {abs(float(s[n])):.3g}, relative uncertainty {rel:.3g}): its entries are at the "
            "precision/underflow limit of the gradient's dtype (a very confident prediction, or a "
            "small loss scale in float16).  Use power_grad_cross_entropy (computes the transformed "
            "gradient from the loss itself), a larger loss scale (GradScaler), or pass scale= explicitly."
        )
    return s


def _check_explicit(g: Tensor, p: Tensor, s: Tensor, live: Tensor, prec: _Precision) -> None:
    """Check that ``q = p - g / s`` is a distribution to within ``rtol`` on ``live`` rows
    (written as ``s p - g >= -(rtol s + eta)`` and ``|sum g| <= rtol s``, safe for ``s = 0``)."""
    tol = prec.rtol * s
    negative = ((s[:, None] * p - g) < -(tol + prec.eta)[:, None]).any(dim=1)
    unnormalised = g.sum(dim=1).abs() > tol + prec.eta * g.shape[1]
    bad = live & (negative | unnormalised)
    if bool(bad.any()):
        n = _first(bad)
        q = p[n] - g[n] / s[n]
        raise PGTAssumptionError(
            f"power_grad_logits(scale=...): row {n} of the incoming gradient is not "
            f"s * (softmax(z) - q) for the given s={float(s[n]):.3g} and a distribution q: the implied "
            f"q = p - g/s has min {float(q.min()):.3g} and sum {float(q.sum()):.6g} (rtol={prec.rtol:g}).  "
            "Check scale= (too small?) and that the loss is softmax cross-entropy on these logits."
        )


def _check_zero_rows(zero: Tensor, p: Tensor, p_alpha: Tensor, s_ref: Tensor, prec: _Precision) -> None:
    """Raise for zero rows that may hide an underflowed gradient (see the module docstring):
    with ``y* = argmax p``, a hard-label gradient ``s_ref (p - e_y*)`` would round to zero
    (``s_ref max_{c != y*} p_c < eta``) while ``s_ref ||p' - e_y*||_inf >= eta``."""
    onehot = F.one_hot(p.argmax(dim=1), p.shape[1]).to(p.dtype)
    pgt_size = _off_target_mass(p_alpha, onehot)  # = ||p' - e_y*||_inf
    ambiguous = zero & (s_ref * (p * (1.0 - onehot)).amax(dim=1) < prec.eta) & (s_ref * pgt_size >= prec.eta)
    if bool(ambiguous.any()):
        n = _first(ambiguous)
        raise PGTAssumptionError(
            f"power_grad_logits: row {n} of the incoming gradient is exactly zero, but its prediction is "
            f"so confident that a cross-entropy gradient at scale {float(s_ref[n]):.3g} underflows to zero "
            f"in {prec.dtype} while its PowerGrad gradient (about {float(s_ref[n] * pgt_size[n]):.3g}) would not: "
            "the row may be ignored or its gradient may have underflowed, and the two cannot be told apart.  "
            "Use power_grad_cross_entropy, or pass a per-row scale= that is 0 on ignored rows."
        )


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the transformed gradient, connected to the logits and the incoming gradient,
    whose own backward raises: differentiating the logits form's gradient is not supported."""

    @staticmethod
    def forward(ctx, out: Tensor, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        return out.clone()

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        raise RuntimeError(
            "power_grad_logits does not support double backward (create_graph=True followed by a "
            "derivative of the gradient): its scale recovery is not differentiable.  Use "
            "power_grad_cross_entropy, whose backward is differentiable."
        )


def _transform(
    logits: Tensor, grad: Tensor, alpha: float, scale: Tensor | None, check: bool, rtol: float | None
) -> Tensor:
    """``g + s (p' - p)`` row-wise; non-finite rows pass through, zero rows stay zero."""
    cdtype = compute_dtype(logits.dtype)
    with autocast_disabled(logits.device.type):
        z = logits.to(cdtype)
        g = grad.to(cdtype)
        prec = _Precision.of(grad.dtype, cdtype, rtol)
        p = torch.softmax(z, dim=1)
        p_alpha = scaled_softmax(z, alpha, dim=1)
        finite = torch.isfinite(g).all(dim=1)
        g = torch.where(finite[:, None], g, torch.zeros_like(g))
        zero = finite & (g == 0).all(dim=1)
        live = finite & ~zero
        if scale is None:
            s = _recover_scale(g, p, p_alpha, live, prec, check)
            # the largest recovered scale, at least that of an unscaled mean-reduced loss (1/N)
            s_ref = torch.clamp_min(s.amax(), 1.0 / g.shape[0]).expand_as(s) if s.numel() else s
        else:
            s_ref = scale.to(device=g.device, dtype=g.dtype).reshape(-1).expand(g.shape[0])
            if check:
                _check_explicit(g, p, s_ref, live, prec)
            s = torch.where(live, s_ref, torch.zeros_like(s_ref))
        if check:
            _check_zero_rows(zero, p, p_alpha, s_ref, prec)
        out = g + s[:, None] * (p_alpha - p)
    return torch.where(finite[:, None], out.to(grad.dtype), grad)


class _PowerGradLogitsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, alpha: float, scale: Tensor | None, check: bool, rtol: float | None):  # type: ignore[override]
        ctx.alpha = alpha
        ctx.check = check
        ctx.rtol = rtol
        ctx.save_for_backward(logits, scale)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.alpha == 1.0:
            return grad, None, None, None, None
        logits, scale = ctx.saved_tensors
        with torch.no_grad():
            out = _transform(logits, grad, ctx.alpha, scale, ctx.check, ctx.rtol)
        if torch.is_grad_enabled():  # create_graph=True: make a later derivative raise clearly
            out = _NoDoubleBackward.apply(out, logits, grad)
        return out, None, None, None, None


def power_grad_logits(
    logits: Tensor,
    alpha: AlphaLike,
    scale: ScaleLike = None,
    check: bool = True,
    rtol: float | None = None,
) -> Tensor:
    """Identity on ``logits`` (shape ``(N, C)``) whose backward applies the PowerGrad Transform
    to the gradient of a downstream softmax cross-entropy.

    Backward: ``g -> g + s * (softmax(alpha * logits) - softmax(logits))`` per row, which turns
    ``s * (p - q)`` into ``s * (softmax(alpha * logits) - q)``.  ``s`` is recovered from ``g``
    under the hard-target assumption when ``scale is None`` (independent of any loss scale),
    or taken from ``scale`` (scalar or ``(N,)``; 0 marks a row as weightless).  Non-finite rows
    pass through, exactly-zero rows stay zero.  What is checked (and what cannot be) and the
    tolerance ``rtol`` are described in the module docstring; violations raise
    :class:`reparam.errors.PGTAssumptionError`.  ``alpha = 1`` returns the incoming gradient
    unchanged; ``alpha = 0`` uses the ``alpha -> 0+`` limit (uniform over finite logits).

    Raises ``ValueError`` for an ``alpha`` that is not a real number in ``[0, 1]``, logits that
    are not a 2-D floating-point tensor, a negative / non-finite ``scale`` or a non-positive ``rtol``.
    """
    alpha = check_alpha(alpha)
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point torch.Tensor")
    if logits.dim() != 2:
        raise PGTAssumptionError(
            f"power_grad_logits expects logits of shape (N, C) (class dimension last), got shape "
            f"{tuple(logits.shape)}; reshape e.g. (N, C, H, W) -> (N*H*W, C) first"
        )
    scale_t: Tensor | None = None
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

    def __init__(self, alpha: AlphaLike, check: bool = True, rtol: float | None = None) -> None:
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
