"""A 1x1 conv followed by a KxK conv (same groups) is one KxK conv."""
from __future__ import annotations

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
    mid, in_per_group = first.shape[:2]
    out, mid_per_group, kh, kw = second.shape
    a = first.reshape(groups, mid // groups, in_per_group)
    b = second.reshape(groups, out // groups, mid_per_group, kh, kw)
    weight = (b.unsqueeze(3) * a.reshape(groups, 1, mid_per_group, in_per_group, 1, 1)).sum(2)
    weight = weight.reshape(out, in_per_group, kh, kw)
    bias = None
    if first_bias is not None:
        bias = (b.sum((3, 4)) * first_bias.reshape(groups, 1, mid_per_group)).sum(2).reshape(out)
    if second_bias is not None:
        bias = second_bias if bias is None else bias + second_bias
    return weight, bias
