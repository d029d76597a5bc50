"""The exact preconditioner ``P = J J^T`` of any merge by autograd, reduced to a mask where possible.

``W, b = merge(theta)``: one SGD step on ``theta`` moves the merged conv by ``-lr J J^T g``
(``g`` the gradient of the merged kernel and bias), exactly when ``merge`` is affine in ``theta``
(check :func:`affinity_defect` first). ``P`` is probed rather than formed: per kernel tap (and
once for the bias) one vector-Jacobian product and one merge, with random per-channel-pair
weights, then confirmed on a random gradient.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from reparam.sgs.preconditioner import SpatialPreconditioner

Merge = Callable[[tuple[Tensor, ...]], tuple[Tensor, Tensor]]
#: relative tolerance for "equal" entries of P and for the confirming probe (float64 rounding)
TOLERANCE = 1e-10


@dataclass
class Reduction:
    """``P = J J^T`` in the smallest form that applies it exactly, or why there is none.

    ``weight``: a mask broadcastable to the kernel (``(kh, kw)`` when every channel pair is
    scaled alike, ``(out, 1, kh, kw)`` per output channel, else the kernel's shape), or a
    :class:`SpatialPreconditioner` (non-diagonal, the same for every channel pair), or None
    (``reason`` says why). ``bias``: the factor of the merged bias's gradient (a scalar or
    ``(out,)`` tensor), None for 1; ``bias_trains`` is False when no parameter moves the bias.
    ``residual``: relative error of the reduced form on a random gradient.
    """

    weight: Tensor | SpatialPreconditioner | None
    bias: Tensor | None = None
    bias_trains: bool = True
    reason: str | None = None
    residual: float = 0.0

    @property
    def kind(self) -> str:
        if self.weight is None:
            return "none"
        return "preconditioner" if isinstance(self.weight, SpatialPreconditioner) else "mask"


def _products(merge: Merge, params: tuple[Tensor, ...]) -> tuple[tuple[Tensor, Tensor], Callable]:
    """``(W, b)`` and a function ``(g_W, g_b) -> J J^T (g_W, g_b)``: ``J^T g`` by a vector-Jacobian
    product, then ``J v = merge(v) - merge(0)`` (``merge`` must be affine: :func:`affinity_defect`)."""
    out, vjp_fn = torch.func.vjp(merge, params)
    with torch.no_grad():
        zero_w, zero_b = merge(tuple(torch.zeros_like(p) for p in params))

    def apply(gw: Tensor, gb: Tensor) -> tuple[Tensor, Tensor]:
        (v,) = vjp_fn((gw, gb))
        with torch.no_grad():
            w, b = merge(tuple(v))
        return w - zero_w, b - zero_b

    return out, apply


def affinity_defect(merge: Merge, params: Sequence[Tensor], seed: int = 0) -> float:
    """Relative second difference ``|f(t + d) + f(t - d) - 2 f(t)| / |f(t + d) - f(t)|`` of the
    merged kernel along a random direction ``d``: 0 up to rounding iff ``merge`` is affine there
    (a product of two trainable tensors, e.g. a BatchNorm weight times a conv weight, is not)."""
    gen = torch.Generator().manual_seed(seed)
    params = tuple(p.detach() for p in params)
    if not params:
        return 0.0
    step = tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * (p.abs().mean() + 1) for p in params)
    with torch.no_grad():
        f0 = merge(params)[0]
        plus = merge(tuple(p + d for p, d in zip(params, step)))[0]
        minus = merge(tuple(p - d for p, d in zip(params, step)))[0]
    first = float((plus - f0).abs().max())
    return float((plus + minus - 2 * f0).abs().max()) / first if first > 0 else 0.0


def _random_signs(shape: tuple[int, ...], gen: torch.Generator, like: Tensor) -> Tensor:
    """Random values with ``1 <= |r| <= 2`` (safe to divide by)."""
    magnitude = 1 + torch.rand(shape, generator=gen, dtype=like.dtype)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(like.dtype)
    return (magnitude * sign).to(like.device)


def _close(a: Tensor, b: Tensor, scale: float) -> bool:
    return bool((a - b).abs().max() <= TOLERANCE * scale)


def jacobian_reduction(merge: Merge, params: Sequence[Tensor], seed: int = 0) -> Reduction:
    """Probe ``P = J J^T`` of ``merge`` at ``params`` and reduce it (see :class:`Reduction`).

    ``merge`` must be affine in ``params``. Per tap ``t``: ``g[o, i, t] = r[o, i]`` (random), zero
    elsewhere, gives column ``t`` of every channel pair's ``P_oi`` (divided by ``r``) if ``P`` acts
    per channel pair; a final random gradient confirms that it does (and that kernel and bias do
    not mix).
    """
    params = tuple(p.detach() for p in params)
    gen = torch.Generator().manual_seed(seed)
    (weight, bias), apply = _products(merge, params)
    out, per_in, kh, kw = weight.shape
    taps = kh * kw
    r = _random_signs((out, per_in), gen, weight)
    columns, leaks = [], []
    for t in range(taps):
        gw = torch.zeros(out, per_in, taps, dtype=weight.dtype, device=weight.device)
        gw[:, :, t] = r
        pw, pb = apply(gw.view_as(weight), torch.zeros_like(bias))
        columns.append(pw.reshape(out, per_in, taps) / r[..., None])
        leaks.append(pb.abs().max())
    pairs = torch.stack(columns, dim=-1)  # (out, in/g, taps, taps): P_oi[:, t]
    rb = _random_signs((out,), gen, weight)
    pw, pb = apply(torch.zeros_like(weight), rb)
    bias_factor = pb / rb
    leaks.append(pw.abs().max())
    scale = max(float(pairs.abs().max()), float(bias_factor.abs().max())) or 1.0
    residual = _confirm(apply, pairs, bias_factor, weight, bias, gen)
    if residual > TOLERANCE or max(float(x) for x in leaks) > TOLERANCE * scale:
        return Reduction(None, reason="J J^T mixes different channel pairs (or the kernel with the bias): no "
                         "per-channel-pair form applies it", residual=residual)
    bias_part = _bias_form(bias_factor, scale)
    reduced = _weight_form(pairs, (kh, kw), scale)
    if reduced is None:
        return Reduction(None, reason="J J^T is not diagonal over the taps and differs between channel pairs",
                         residual=residual, **bias_part)
    return Reduction(reduced, residual=residual, **bias_part)


def _confirm(apply: Callable, pairs: Tensor, bias_factor: Tensor, weight: Tensor, bias: Tensor, gen) -> float:
    """Relative error of the per-channel-pair form of ``P`` on a random gradient."""
    gw = torch.randn(weight.shape, generator=gen, dtype=weight.dtype).to(weight.device)
    gb = torch.randn(bias.shape, generator=gen, dtype=bias.dtype).to(bias.device)
    true_w, true_b = apply(gw, gb)
    flat = gw.reshape(*pairs.shape[:2], -1)
    mine_w = torch.einsum("oist,oit->ois", pairs, flat).reshape(weight.shape)
    err = max(float((true_w - mine_w).abs().max()), float((true_b - bias_factor * gb).abs().max()))
    size = max(float(true_w.abs().max()), float(true_b.abs().max()))
    return err / size if size > 0 else err


def _bias_form(factor: Tensor, scale: float) -> dict:
    if _close(factor, torch.zeros_like(factor), scale):
        return {"bias": None, "bias_trains": False}
    if _close(factor, torch.ones_like(factor), scale):
        return {"bias": None}
    if _close(factor, factor[:1].expand_as(factor), scale):
        return {"bias": factor[0].clone()}
    return {"bias": factor}


def _weight_form(pairs: Tensor, size: tuple[int, int], scale: float) -> Tensor | SpatialPreconditioner | None:
    """A mask (diagonal ``P``), reduced to the smallest broadcastable shape; else a shared
    :class:`SpatialPreconditioner`; else None."""
    diagonal = torch.diagonal(pairs, dim1=-2, dim2=-1)  # (out, in/g, taps)
    off = pairs - torch.diag_embed(diagonal)
    first = pairs[:1, :1].expand_as(pairs)
    if not _close(off, torch.zeros_like(off), scale):
        return SpatialPreconditioner(pairs[0, 0].clone()) if _close(pairs, first, scale) else None
    mask = diagonal.reshape(*pairs.shape[:2], *size)
    if _close(mask, mask[:1, :1].expand_as(mask), scale):
        return mask[0, 0].clone()
    if _close(mask, mask[:, :1].expand_as(mask), scale):
        return mask[:, :1].clone()
    return mask.clone()
