"""Negative control: the public PGT implementation's reconstruct-from-gradient behaviour.

The reference registers a hook on the logits that rebuilds the probabilities from the
incoming gradient as ``p_hat = grad / B + q`` (``B`` = batch size, ``q`` = one-hot labels),
applies ``p_hat**alpha / sum p_hat**alpha`` and sends ``B * (p_hat' - q)`` on.  For a
mean-reduced cross-entropy multiplied by a loss scale ``S`` the incoming gradient is
``S (p - q) / B``, so ``p_hat = (S / B**2)(p - q) + q``: the probabilities (and the
transformed gradient, which should be ``S (p' - q) / B``) are right only when ``S == B**2``.
With ``S < B**2`` (e.g. no AMP, ``S = 1``) the gradient is wrong; with ``S > B**2`` the
true-class entry of ``p_hat`` turns negative and ``p_hat**alpha`` is NaN.

This module exists only so the verification suite can show the failure; it is deliberately
not part of the library.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = ["reference_reconstruct_from_grad_hook"]


def reference_reconstruct_from_grad_hook(logits: Tensor, target: Tensor, alpha: float) -> RemovableHandle:
    """Register the reference's reconstruct-from-gradient PGT hook on ``logits`` ``(B, C)``
    for hard labels ``target`` ``(B,)``; returns the hook handle."""
    batch, num_classes = logits.shape
    q = F.one_hot(target, num_classes).to(logits.dtype)

    def hook(grad: Tensor) -> Tensor:
        p_hat = grad / batch + q  # assumes grad == (p - q) / B * B**2 — i.e. loss scale B**2
        powered = p_hat.pow(alpha)
        p_new = powered / powered.sum(dim=1, keepdim=True)
        return (p_new - q) * batch

    return logits.register_hook(hook)
