r"""Closed forms of the PowerGrad Transform's analysis (paper §3-§4.2).

For a distribution ``p`` over ``C`` classes and ``0 <= alpha <= 1``:

* transform (eq. 8):  ``p'_i = p_i**alpha / sum_j p_j**alpha`` (= ``softmax(alpha * z)`` when
  ``p = softmax(z)``); ``alpha = 0`` gives the limit ``alpha -> 0+``, the uniform distribution
  over the support ``{i : p_i > 0}`` (zero entries, e.g. masked logits, stay 0),
* stationary threshold (Lemma 1):  ``T = (sum_j p_j**alpha) ** (1 / (alpha - 1))`` (sum over the
  support) with the limit ``T = exp(sum_j p_j log p_j) = exp(-H(p))`` at ``alpha = 1``;
  ``p'_i >= p_i`` iff ``p_i <= T``, and ``p'_i`` always lies between ``p_i`` and ``T``,
* the PGT logit gradient (eq. 9):  ``p' - q``.

All functions work on the last dimension and accept batched tensors.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import AlphaLike, check_alpha, scaled_softmax

__all__ = [
    "power_transform",
    "stationary_threshold",
    "pgt_logit_gradient",
    "logit_gradient_bounds",
]


def _as_probs(p: Tensor) -> Tensor:
    if not isinstance(p, Tensor):
        p = torch.as_tensor(p, dtype=torch.float64)
    if not p.is_floating_point():
        p = p.to(torch.float64)
    if p.dim() == 0 or p.shape[-1] == 0:
        raise ValueError("p must have a non-empty class (last) dimension")
    if bool((p < 0).any()) or not bool(torch.isfinite(p).all()):
        raise ValueError("p must be finite and non-negative")
    return p


def power_transform(p: Tensor, alpha: AlphaLike) -> Tensor:
    """``p**alpha / sum(p**alpha)`` along the last dimension (eq. 8).

    Computed as ``softmax(alpha * log p)`` so tiny probabilities do not underflow; zero
    entries stay zero.  ``alpha = 0`` returns the limit ``alpha -> 0+``: the uniform
    distribution over the support ``{i : p_i > 0}`` (Proposition 1; ``1/C`` when no entry is
    zero), consistent with the loss at ``alpha = 0`` on masked (``-inf``) logits.  ``p`` need
    not be normalised (the result is).
    """
    alpha = check_alpha(alpha)
    return scaled_softmax(torch.log(_as_probs(p)), alpha)


def stationary_threshold(p: Tensor, alpha: AlphaLike) -> Tensor:
    r"""Lemma 1's stationary threshold ``T = (sum_j p_j**alpha) ** (1/(alpha-1))`` of the
    distribution ``p / sum(p)`` (shape ``(..., C)``; returns shape ``(...)``, in ``p``'s dtype).

    Sums run over the support ``p_j > 0`` (``0**alpha = 0``, and at ``alpha = 0`` the limit
    ``alpha -> 0+``, so ``T(p, 0) = 1 / |support|``, matching :func:`power_transform`).  With
    ``t = 1 - alpha`` and ``x_j = -log p_j >= 0``,

    .. math::  \log T = -\frac{1}{t} \log\Big(1 + \sum_j p_j\,\mathrm{expm1}(t x_j)\Big),

    a sum of non-negative terms.  Each term is taken in the log domain,
    ``log p_j + t x_j + log(-expm1(-t x_j))``, and combined with ``logsumexp`` and
    ``logaddexp(0, .)``, so nothing overflows (subnormal ``p_j`` at small ``alpha``), underflows
    (very peaked ``p``) or cancels (``alpha -> 1``, where the textbook form divides rounding
    noise by ``alpha - 1``).  At ``alpha = 1`` the limit ``exp(sum_j p_j log p_j) = exp(-H(p))``
    is returned.  Computed in float64 whatever the input dtype.
    """
    alpha = check_alpha(alpha)
    p = _as_probs(p)
    x = p.to(torch.float64)
    total = x.sum(dim=-1)
    if bool((total <= 0).any()):
        raise ValueError("p must have a positive sum along the class dimension")
    support = x > 0
    logp = torch.log(x) - torch.log(total).unsqueeze(-1)
    if alpha == 1.0:
        log_t = torch.where(support, torch.exp(logp) * logp, torch.zeros_like(x)).sum(dim=-1)
    else:
        t = 1.0 - alpha
        tx = t * (-logp).clamp_min(0.0)
        log_terms = torch.where(support, logp + tx + torch.log(-torch.expm1(-tx)), torch.full_like(x, -math.inf))
        log_t = -torch.logaddexp(torch.zeros_like(total), torch.logsumexp(log_terms, dim=-1)) / t
    return torch.exp(log_t).to(p.dtype)


def pgt_logit_gradient(p: Tensor, q: Tensor, alpha: AlphaLike) -> Tensor:
    """The PGT gradient of cross-entropy w.r.t. the logits, ``p' - q`` (eq. 9)."""
    return power_transform(p, alpha) - torch.as_tensor(q, dtype=p.dtype, device=p.device)


def logit_gradient_bounds(p: Tensor, q: Tensor, alpha: AlphaLike) -> tuple[Tensor, Tensor]:
    r"""Per-class bounds on ``|dL/dz_i|`` after PGT (§4.2, made precise).

    Since ``p'_i`` lies between ``p_i`` and the threshold ``T`` (Lemma 1 and
    ``p'_i <= T  <=>  p_i <= T``), ``p'_i - q_i`` lies between ``p_i - q_i`` and ``T - q_i``.
    Returns ``(lower, upper)`` with ``lower_i = min(|p_i - q_i|, |T - q_i|)`` where both have
    the same sign (else 0) and ``upper_i = max(|p_i - q_i|, |T - q_i|)``.  For a one-hot ``q``
    this gives §4.2's cases: a small non-target derivative grows towards ``T`` (``delta+``), a
    large wrong-class derivative shrinks towards ``T`` and the true-class derivative moves
    towards ``T - 1`` (``epsilon-``).
    """
    p = _as_probs(p)
    q = torch.as_tensor(q, dtype=p.dtype, device=p.device)
    t = stationary_threshold(p, alpha).unsqueeze(-1)
    a = p - q
    b = t - q
    same_sign = (a * b) >= 0
    lower = torch.where(same_sign, torch.minimum(a.abs(), b.abs()), torch.zeros_like(a))
    upper = torch.maximum(a.abs(), b.abs())
    return lower, upper
