"""Spatial preconditioners: the general ``P = J J^T`` of a linear reparameterization."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SpatialPreconditioner:
    """A ``(kh*kw, kh*kw)`` matrix applied to the gradient of every channel pair:
    ``g[o, i] <- P vec(g[o, i])``. For mask branches ``P = diag(G)`` (plain SGS); linear
    branches that are not masks (DBB's 1x1 -> average) add off-diagonal terms.
    """

    matrix: Tensor

    def __post_init__(self) -> None:
        m = self.matrix
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"SpatialPreconditioner needs a square matrix, got shape {tuple(m.shape)}")

    @property
    def taps(self) -> int:
        return self.matrix.shape[0]

    def is_diagonal(self) -> bool:
        return bool(torch.equal(self.matrix, torch.diag(torch.diagonal(self.matrix))))

    def apply_(self, grad: Tensor, workspace: Tensor | None = None) -> Tensor:
        """Replace ``grad`` (shape ``(out, in/g, kh, kw)``) by ``P`` applied over its taps:
        every row of the ``(out * in/g, kh*kw)`` view becomes ``P vec(g[o, i])``, i.e. the view
        is replaced by ``view @ P^T``.

        ``workspace`` (any tensor of ``grad.numel()`` elements, ``grad``'s dtype and device)
        receives the product before it is copied back; with it and a contiguous ``grad`` whose
        dtype/device match the matrix's, nothing is allocated. Without it one temporary is.
        """
        flat = grad.reshape(-1, self.taps)  # a view when grad is contiguous
        matrix = self.matrix
        if matrix.dtype != grad.dtype or matrix.device != grad.device:
            matrix = matrix.to(device=grad.device, dtype=grad.dtype)
        out = torch.empty_like(flat) if workspace is None else workspace.view(flat.shape)
        torch.matmul(flat, matrix.T, out=out)
        grad.copy_(out.view(grad.shape))
        return grad

