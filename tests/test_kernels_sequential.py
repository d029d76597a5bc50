"""``merge_1x1_then_kxk``: the contraction equals the broadcast formula, values and gradients,
and never allocates the ``(groups, out, mid, in, kh, kw)`` product."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from reparam.kernels import merge_1x1_then_kxk


def _broadcast_reference(first, first_bias, second, second_bias, groups):
    """The original formula: the full broadcast product, then a sum over ``mid``."""
    mid, in_per_group = first.shape[:2]
    out, mid_per_group, kh, kw = second.shape
    a = first.reshape(groups, mid // groups, in_per_group)
    b = second.reshape(groups, out // groups, mid_per_group, kh, kw)
    weight = (b.unsqueeze(3) * a.reshape(groups, 1, mid_per_group, in_per_group, 1, 1)).sum(2)
    bias = None
    if first_bias is not None:
        bias = (b.sum((3, 4)) * first_bias.reshape(groups, 1, mid_per_group)).sum(2).reshape(out)
    if second_bias is not None:
        bias = second_bias if bias is None else bias + second_bias
    return weight.reshape(out, in_per_group, kh, kw), bias


# (in, mid, out, groups, (kh, kw)): dense, grouped, depthwise, non-square, 1x1
SHAPES = [
    (3, 5, 4, 1, (3, 3)),
    (6, 4, 8, 2, (3, 3)),
    (8, 8, 8, 8, (3, 3)),
    (4, 6, 6, 2, (1, 5)),
    (5, 7, 3, 1, (1, 1)),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("biases", [(True, True), (True, False), (False, True), (False, False)])
def test_matches_the_broadcast_formula_with_gradients(shape, biases):
    cin, mid, out, groups, (kh, kw) = shape
    gen = torch.Generator().manual_seed(sum(shape[:4]) + 10 * biases[0] + biases[1])

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64, requires_grad=True)

    inputs = [
        rand(mid, cin // groups, 1, 1), rand(mid) if biases[0] else None,
        rand(out, mid // groups, kh, kw), rand(out) if biases[1] else None,
    ]
    leaves = [t for t in inputs if t is not None]
    results = []
    for fn in (merge_1x1_then_kxk, _broadcast_reference):
        weight, bias = fn(*inputs, groups)
        loss = (weight * torch.linspace(-1, 1, weight.numel(), dtype=torch.float64).view_as(weight)).sum()
        if bias is not None:
            loss = loss + (bias * torch.arange(bias.numel(), dtype=torch.float64)).sum()
        results.append((weight, bias, torch.autograd.grad(loss, leaves)))
    (w, b, grads), (w_ref, b_ref, grads_ref) = results
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    assert (b is None) == (b_ref is None)
    if b is not None:
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_composes_the_two_convolutions():
    """conv_kxk(conv_1x1(x) + first_bias) with replicate-free valid padding == one conv."""
    gen = torch.Generator().manual_seed(0)
    first, first_bias = torch.randn(6, 2, 1, 1, generator=gen, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    second, second_bias = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 7, generator=gen, dtype=torch.float64)
    expected = F.conv2d(F.conv2d(x, first, first_bias, groups=2), second, second_bias, groups=2)
    weight, bias = merge_1x1_then_kxk(first, first_bias, second, second_bias, groups=2)
    torch.testing.assert_close(F.conv2d(x, weight, bias, groups=2), expected)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


@pytest.mark.parametrize("groups", [1, 32])
def test_no_intermediate_larger_than_the_kernels(groups):
    """A 64-channel layer: the broadcast product would be mid/g times the merged kernel."""
    first = torch.randn(64, 64 // groups, 1, 1, requires_grad=True)
    second = torch.randn(64, 64 // groups, 3, 3, requires_grad=True)
    first_bias = torch.randn(64, requires_grad=True)
    with _LargestTensor() as mode:
        weight, bias = merge_1x1_then_kxk(first, first_bias, second, None, groups)
        (weight.square().sum() + bias.sum()).backward()
    assert mode.largest <= max(weight.numel(), second.numel(), first.numel())
