"""A 1x1 conv followed by a KxK conv (same groups) is one KxK conv."""
from __future__ import annotations

import torch
from torch import Tensor


def merge_1x1_then_kxk(
    first: Tensor, first_bias: Tensor | None, second: Tensor, second_bias: Tensor | None, groups: int
) -> tuple[Tensor, Tensor | None]:
    """Compose ``conv_kxk(conv_1x1(x))`` into one kernel.

    ``first``: ``(mid, in/g, 1, 1)``, ``second``: ``(out, mid/g, kh, kw)``. Within each
    group ``W[o, i] = sum_m second[o, m] * first[m, i]`` and
    ``b[o] = second_bias[o] + sum_{m, taps} second[o, m, :, :] * first_bias[m]``. The bias
    term is exact only if the KxK conv sees ``first_bias`` (not zeros) in its padding ring.
    """
    in_per_group = first.shape[1]
    out, mid_per_group, kh, kw = second.shape
    a = first.reshape(groups, mid_per_group, in_per_group)
    b = second.reshape(groups, out // groups, mid_per_group, kh, kw)
    # A contraction over m (a batched matrix product per group): never materializes the
    # (groups, out/g, mid/g, in/g, kh, kw) product.
    weight = torch.einsum("gomhw,gmi->goihw", b, a).reshape(out, in_per_group, kh, kw)
    bias = None
    if first_bias is not None:
        bias = torch.einsum("gomhw,gm->go", b, first_bias.reshape(groups, mid_per_group)).reshape(out)
    if second_bias is not None:
        bias = second_bias if bias is None else bias + second_bias
    return weight, bias
