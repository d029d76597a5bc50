"""Placing a smaller kernel inside a larger one."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def centre_pad(kernel: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad the two spatial dims of ``kernel`` so that it is centred in ``size``.

    A ``(bh, bw)`` kernel with odd sides inside an odd ``(kh, kw)`` kernel gains
    ``(kh - bh) / 2`` rows above and below and ``(kw - bw) / 2`` columns left and right.
    """
    bh, bw = kernel.shape[-2:]
    kh, kw = size
    dh, dw = (kh - bh) // 2, (kw - bw) // 2
    if dh == 0 and dw == 0:
        return kernel
    return F.pad(kernel, (dw, dw, dh, dh))


def window_mask(window: tuple[int, int], size: tuple[int, int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Binary ``(kh, kw)`` mask of the centred ``window`` receptive field inside ``size``."""
    return centre_pad(torch.ones(1, 1, *window, dtype=dtype), size)[0, 0]
