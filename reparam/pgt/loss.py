r"""PowerGrad cross-entropy: ordinary cross-entropy forward, PGT backward.

Notation (one row = one sample, or one spatial position for ``(N, C, d1, ...)`` inputs):
``z`` the logits, ``p = softmax(z)``, ``w`` the class weights (all ones if none),
``eps`` the label smoothing.  ``F.cross_entropy`` is, row by row,

.. math::  \ell = -\sum_c u_c \log p_c ,

with the *weighted target mass* ``u``

* class index ``y``:  ``u_c = (1 - eps) w_y [c = y] + (eps / C) w_c`` (``u = 0`` on rows whose
  ``y == ignore_index``);
* probabilities ``t``:  ``u_c = w_c ((1 - eps) t_c + eps / C)``.

Its gradient is ``d ell / dz = r p - u = r (p - q)`` with ``r = sum_c u_c`` and the normalised
target distribution ``q = u / r``.  The reduction multiplies each row by a factor ``k``: 1 for
``"sum"``, ``grad_output[row]`` for ``"none"``, and ``1 / D`` for ``"mean"`` where ``D`` is the sum
of ``w_y`` over non-ignored rows (class indices) or the number of rows (probabilities).

The PowerGrad Transform replaces ``p`` by ``p' = p**alpha / sum_j p_j**alpha``.  Because
``p**alpha / sum p**alpha = softmax(alpha * z)``, the transformed gradient is

.. math::  \hat g = k \, (r \, \mathrm{softmax}(\alpha z) - u),

which is exactly the gradient of the surrogate ``CE(alpha * z, target) / alpha`` (same weight,
smoothing, ignore_index and reduction); at ``alpha = 1`` it is the ordinary gradient (and the
loss then simply is ``F.cross_entropy``); at ``alpha = 0`` ``softmax(alpha * z)`` is replaced by
its limit ``alpha -> 0+``, the uniform distribution over the classes with a finite logit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import AlphaLike, autocast_disabled, check_alpha, compute_dtype, scaled_softmax

__all__ = ["PowerGradCrossEntropy", "power_grad_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_options(reduction: str, label_smoothing: float) -> None:
    """Reject an unknown ``reduction`` or a ``label_smoothing`` outside ``[0, 1]``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")


def _rows(x: Tensor) -> Tensor:
    """View a ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)`` tensor as ``(rows, C)``."""
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _unrows(rows: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_rows` for a tensor of the original ``shape``."""
    if len(shape) <= 2:
        return rows.reshape(shape)
    moved = (shape[0], *shape[2:], shape[1])
    return rows.reshape(moved).movedim(-1, 1)


def _target_mass(
    target: Tensor,
    num_classes: int,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Return ``(u, D)``: the weighted target mass per row (shape ``(rows, C)``) and the
    denominator ``F.cross_entropy`` uses for ``reduction="mean"``."""
    eps = float(label_smoothing)
    w = weight.to(dtype) if weight is not None else None
    if target.is_floating_point():  # class probabilities
        t = _rows(target).to(dtype)
        if eps > 0.0:
            t = t * (1.0 - eps) + eps / num_classes
        u = t * w if w is not None else t
        denominator = torch.tensor(float(u.shape[0]), dtype=dtype, device=u.device)
        return u, denominator
    y = target.reshape(-1)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    valid_f = valid.to(dtype)
    onehot = F.one_hot(y_safe, num_classes).to(dtype)
    w_y = (w[y_safe] if w is not None else torch.ones_like(valid_f)) * valid_f
    u = (1.0 - eps) * w_y[:, None] * onehot
    if eps > 0.0:
        smooth = (w[None, :] if w is not None else torch.ones_like(onehot[:1])) * (eps / num_classes)
        u = u + smooth * valid_f[:, None]
    return u, w_y.sum()


def _cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> Tensor:
    """``F.cross_entropy`` evaluated in :func:`compute_dtype` with autocast off (what autocast
    itself does for cross-entropy); differentiable, the gradient returns in the logits' dtype."""
    cdtype = compute_dtype(logits.dtype)
    with autocast_disabled(logits.device.type):
        return F.cross_entropy(
            logits.to(cdtype),
            target.to(cdtype) if target.is_floating_point() else target,
            weight=weight.to(cdtype) if weight is not None else None,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )


def _reduction_factor(grad_output: Tensor, reduction: str, denominator: Tensor) -> Tensor:
    """The per-row factor ``k`` (times the incoming gradient) that multiplies ``r p - u``."""
    if reduction == "none":
        return grad_output.reshape(-1, 1)
    if reduction == "sum":
        return grad_output
    # mean; F.cross_entropy's gradient is 0 when every row is ignored (denominator 0)
    nonzero = denominator != 0
    safe = torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, grad_output / safe, torch.zeros_like(grad_output))


class _PowerGradCrossEntropyFn(torch.autograd.Function):
    """``forward``: ``F.cross_entropy``; ``backward``: ``k (r softmax(alpha z) - u)``.

    The backward is written with differentiable torch ops, so double backward (``create_graph``,
    gradient penalties, Hessian-vector products) differentiates it: its derivative with respect
    to ``z`` is ``k r alpha (diag(s) - s s^T)`` with ``s = softmax(alpha z)``, the second
    derivative of the surrogate ``CE(alpha z, target) / alpha``, and it is linear in the
    incoming gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: Tensor,
        target: Tensor,
        alpha: float,
        weight: Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
    ) -> Tensor:
        ctx.save_for_backward(logits, target, weight)
        ctx.alpha = alpha
        ctx.ignore_index = ignore_index
        ctx.reduction = reduction
        ctx.label_smoothing = label_smoothing
        return _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        logits, target, weight = ctx.saved_tensors
        cdtype = compute_dtype(logits.dtype)
        with autocast_disabled(logits.device.type):
            z = _rows(logits).to(cdtype)
            u, denominator = _target_mass(
                target, z.shape[1], weight, ctx.ignore_index, ctx.label_smoothing, cdtype
            )
            grad = u.sum(dim=1, keepdim=True) * scaled_softmax(z, ctx.alpha, dim=1) - u
            grad = grad * _reduction_factor(grad_output.to(cdtype), ctx.reduction, denominator)
        return _unrows(grad, logits.shape).to(logits.dtype), None, None, None, None, None, None


def power_grad_cross_entropy(
    logits: Tensor,
    target: Tensor,
    alpha: AlphaLike,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy whose value is ``F.cross_entropy(logits, target, ...)`` and whose gradient
    with respect to ``logits`` is the PowerGrad-transformed one.

    Per row the backward returns ``k * (r * softmax(alpha * logits) - u)`` (see the module
    docstring), i.e. the gradient of ``F.cross_entropy(alpha * logits, target, ...) / alpha``
    with the same ``weight``, ``ignore_index``, ``reduction`` and ``label_smoothing``.  The
    incoming ``grad_output`` (e.g. a GradScaler loss scale) multiplies the result, so the
    transform is correct at any loss scale.  ``alpha = 1`` runs ``F.cross_entropy`` itself, so
    value and gradient are bit-for-bit the ordinary ones; ``alpha = 0`` uses the limit
    ``alpha -> 0+`` of ``softmax(alpha * logits)``: uniform over the classes whose logit is
    finite, 0 on masked (``-inf``) classes.  The backward is differentiable: double backward
    (``create_graph=True``) gives the second derivatives of the surrogate.

    Shapes follow ``F.cross_entropy``: ``logits`` ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)``;
    ``target`` class indices (integer) or class probabilities (same shape as ``logits``).
    Half/bfloat16 logits (e.g. under autocast) are processed in float32: the loss is returned in
    float32 (as autocast does for cross-entropy) and the gradient in the logits' dtype.
    Targets are treated as constants: a probability target that requires grad is rejected.

    Raises ``ValueError`` for an ``alpha`` that is not a real number in ``[0, 1]`` (or is a
    tensor requiring grad), an unknown ``reduction``, a ``label_smoothing`` outside ``[0, 1]``
    or a target that requires grad.
    """
    alpha = check_alpha(alpha)
    _check_options(reduction, label_smoothing)
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits must have a class dimension; got a 0-d tensor")
    if target.requires_grad:
        raise ValueError(
            "target requires grad, but PowerGrad cross-entropy treats targets as constants; "
            "pass target.detach()"
        )
    if weight is not None and weight.requires_grad:
        raise ValueError("weight requires grad; class weights are constants here, pass weight.detach()")
    if alpha == 1.0:  # the ordinary gradient, bit for bit: F.cross_entropy's own backward
        return _cross_entropy(logits, target, weight, int(ignore_index), reduction, float(label_smoothing))
    return _PowerGradCrossEntropyFn.apply(
        logits, target, alpha, weight, int(ignore_index), reduction, float(label_smoothing)
    )


class PowerGradCrossEntropy(nn.Module):
    """Module form of :func:`power_grad_cross_entropy` (drop-in for ``nn.CrossEntropyLoss``).

    ``forward(logits, target)`` returns the ordinary cross-entropy; its backward sends
    ``k * (r * softmax(alpha * logits) - u)`` to the logits, the gradient of
    ``CE(alpha * logits, target) / alpha``.  ``alpha = 1`` reproduces ``nn.CrossEntropyLoss``'s
    gradient, ``alpha = 0`` replaces the prediction by the uniform distribution.
    """

    weight: Tensor | None

    def __init__(
        self,
        alpha: AlphaLike,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        _check_options(reduction, label_smoothing)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.register_buffer("weight", None if weight is None else weight.detach().clone())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return power_grad_cross_entropy(
            logits, target, self.alpha, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, label_smoothing={self.label_smoothing}, "
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"
        )
