r"""Closed forms of the PowerGrad Transform's analysis (paper §3-§4.2).

For a distribution ``p`` over ``C`` classes and ``0 <= alpha <= 1``:

* transform (eq. 8):  ``p'_i = p_i**alpha / sum_j p_j**alpha`` (= ``softmax(alpha * z)`` when
  ``p = softmax(z)``); ``alpha = 0`` gives the uniform distribution (``0**0 = 1``),
* stationary threshold (Lemma 1):  ``T = (sum_j p_j**alpha) ** (1 / (alpha - 1))`` with the
  limit ``T = exp(sum_j p_j log p_j) = exp(-H(p))`` at ``alpha = 1``;
  ``p'_i >= p_i`` iff ``p_i <= T``, and ``p'_i`` always lies between ``p_i`` and ``T``,
* the PGT logit gradient (eq. 9):  ``p' - q``.

All functions work on the last dimension and accept batched tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_alpha

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


def power_transform(p: Tensor, alpha: float) -> Tensor:
    """``p**alpha / sum(p**alpha)`` along the last dimension (eq. 8).

    Computed as ``softmax(alpha * log p)`` so tiny probabilities do not underflow; zero
    entries stay zero for ``alpha > 0``; ``alpha = 0`` returns the uniform distribution ``1/C``
    (Proposition 1).  ``p`` need not be normalised (the result is).
    """
    alpha = check_alpha(alpha)
    p = _as_probs(p)
    if alpha == 0.0:
        return torch.full_like(p, 1.0 / p.shape[-1])
    return torch.softmax(alpha * torch.log(p), dim=-1)


def stationary_threshold(p: Tensor, alpha: float) -> Tensor:
    """Lemma 1's stationary threshold ``(sum_j p_j**alpha) ** (1/(alpha-1))`` of the distribution
    ``p / sum(p)`` (shape ``(..., C)``; returns shape ``(...)``).

    With ``s = sum p`` and ``E = sum_j (p_j**alpha - p_j) = sum_j p_j expm1((alpha-1) log p_j)``
    (non-negative terms, no cancellation), ``sum_j (p_j/s)**alpha = s**-alpha (s + E)``, so
    ``log T = log1p(E / s) / (alpha - 1) - log s``.  This stays accurate as ``alpha -> 1``,
    where the textbook form divides rounding noise by ``alpha - 1``; at ``alpha = 1`` the limit
    ``exp(sum_j p_j log p_j)`` (= ``exp(-entropy)``) is returned.  ``alpha = 0`` counts zero
    entries as ``0**0 = 1``, giving ``1/C`` (Proposition 1).
    """
    alpha = check_alpha(alpha)
    p = _as_probs(p)
    total = p.sum(dim=-1)
    if bool((total <= 0).any()):
        raise ValueError("p must have a positive sum along the class dimension")
    positive = p > 0
    logp = torch.log(torch.where(positive, p, torch.ones_like(p)))
    if alpha == 1.0:
        pn = p / total.unsqueeze(-1)
        logpn = logp - torch.log(total).unsqueeze(-1)
        return torch.exp(torch.where(positive, pn * logpn, torch.zeros_like(p)).sum(dim=-1))
    # p_j**alpha - p_j, with 0**alpha = 0 (alpha > 0) or 1 (alpha = 0)
    zero_term = 1.0 if alpha == 0.0 else 0.0
    excess = torch.where(
        positive, p * torch.expm1((alpha - 1.0) * logp), torch.full_like(p, zero_term)
    ).sum(dim=-1)
    return torch.exp(torch.log1p(excess / total) / (alpha - 1.0) - torch.log(total))


def pgt_logit_gradient(p: Tensor, q: Tensor, alpha: float) -> Tensor:
    """The PGT gradient of cross-entropy w.r.t. the logits, ``p' - q`` (eq. 9)."""
    return power_transform(p, alpha) - torch.as_tensor(q, dtype=p.dtype, device=p.device)


def logit_gradient_bounds(p: Tensor, q: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
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
