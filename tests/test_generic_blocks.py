"""The generic path on blocks no code here knows by name: fused kernel by impulse response,
``P = J J^T`` by autograd, reduced; equal to the closed forms where both exist, and the plain
conv trained with it follows the branched block's trajectory exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reparam import ACBlock, DBBlock, RepVGGBlock, SpatialPreconditioner, attach_sgs
from reparam.adapters import GenericAdapter, analyse
from reparam.kernels import identity_kernel, window_mask
from verification.strategies import examples

WINDOWS = {"square": lambda k: (k, k), "row": lambda k: (1, k), "column": lambda k: (k, 1), "point": lambda k: (1, 1)}


class Parallel(nn.Module):
    """``sum_n s_n conv_n(x) (+ c x)``: parallel convs with constant scalar scales, all aligned on a
    ``k x k`` kernel with dilation ``d``; an optional constant identity branch."""

    def __init__(self, channels, out, k, stride, dilation, groups, windows, scales, constant, bias):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, out, w, stride, (dilation * (w[0] // 2), dilation * (w[1] // 2)), dilation, groups,
                      bias=bias, dtype=torch.float64)
            for w in windows
        )
        self.scales, self.constant = scales, constant

    def forward(self, x):
        out = sum(s * conv(x) for s, conv in zip(self.scales, self.convs))
        return out + self.constant * x if self.constant else out


@st.composite
def parallel_blocks(draw):
    k = draw(st.sampled_from([1, 3, 5]))
    groups = draw(st.sampled_from([1, 2]))
    channels = 2 * draw(st.integers(1, 2))
    stride = draw(st.sampled_from([1, 2]))
    constant = draw(st.sampled_from([0.0, 0.0, 1.0, -0.5])) if stride == 1 else 0.0
    out = channels if constant else 2 * draw(st.integers(1, 2))
    names = draw(st.lists(st.sampled_from(sorted(WINDOWS)), min_size=1, max_size=4))
    windows = [WINDOWS["square"](k)] + [WINDOWS[n](k) for n in names]
    scales = [draw(st.sampled_from([1.0, 2.0, -0.5, 0.25])) for _ in windows]
    torch.manual_seed(draw(st.integers(0, 99)))
    block = Parallel(channels, out, k, stride, draw(st.sampled_from([1, 2])), groups, windows, scales, constant,
                     bias=draw(st.booleans()))
    return block


def closed_form_mask(block: Parallel) -> torch.Tensor:
    """``G = sum_n s_n^2 M_n`` from the kernel algebra's window masks."""
    size = block.convs[0].kernel_size
    return sum(s * s * window_mask(c.kernel_size, size, torch.float64) for s, c in zip(block.scales, block.convs))


@settings(max_examples=examples(8))
@given(parallel_blocks())
def test_generic_mask_equals_closed_form(block):
    result = analyse(GenericAdapter(block))
    assert result.exact, result.reasons
    expected = closed_form_mask(block)
    assert result.mask.shape == expected.shape
    assert torch.allclose(result.mask, expected, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, block.convs[0].in_channels, 7, 7, dtype=torch.float64)
    conv = F.conv2d(x, result.weight, result.bias, block.convs[0].stride, block.convs[0].padding,
                    block.convs[0].dilation, block.convs[0].groups)
    assert torch.allclose(conv, block(x), rtol=0, atol=1e-12)
    if block.constant:
        c = block.constant * identity_kernel(block.convs[0].out_channels, block.convs[0].groups,
                                             block.convs[0].kernel_size, dtype=torch.float64)
        assert torch.allclose(result.constant, c, atol=1e-15)
    else:
        assert result.constant is None
    with_bias = [s * s for s, c in zip(block.scales, block.convs) if c.bias is not None]
    if with_bias:
        assert result.bias_trains and (result.bias_mask is None or
                                       torch.allclose(result.bias_mask, torch.tensor(sum(with_bias), dtype=torch.float64)))
    else:
        assert not result.bias_trains


@pytest.mark.parametrize("make", [
    lambda: ACBlock(4, 4, 3, bn="none", dtype=torch.float64),
    lambda: RepVGGBlock(4, 4, 3, bn="none", dtype=torch.float64),
    lambda: ACBlock(4, 6, 5, stride=2, dilation=2, groups=2, bn="none", dtype=torch.float64),
])
def test_generic_jjt_equals_block_mask(make):
    block = make()
    result = analyse(GenericAdapter(block, block.geometry))  # the generic path, not the block's closed form
    assert result.exact and torch.allclose(result.mask, block.sgs_mask().double(), rtol=0, atol=1e-12)
    constant = result.constant if result.constant is not None else torch.zeros((), dtype=torch.float64)
    assert torch.allclose(constant, block.constant_kernel().double(), atol=1e-15)


def test_generic_jjt_equals_dbb_preconditioner():
    block = DBBlock(4, 4, 3, bn="none", branches=("kxk", "1x1", "1x1_avg"), dtype=torch.float64)
    result = analyse(GenericAdapter(block, block.geometry))
    assert result.exact and isinstance(result.mask, SpatialPreconditioner)
    assert torch.allclose(result.mask.matrix, block.spatial_preconditioner(), rtol=0, atol=1e-12)


def test_product_branch_is_not_exact():
    block = DBBlock(4, 4, 3, bn="none", branches=("kxk", "1x1_kxk"), dtype=torch.float64)
    result = analyse(GenericAdapter(block, block.geometry))
    assert not result.exact and "not linear" in result.reasons[0]


def _plain_conv(block: Parallel, result) -> nn.Conv2d:
    c = block.convs[0]
    conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                     dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(result.weight)
        conv.bias.copy_(result.bias)
    conv.bias.requires_grad_(result.bias_trains)
    return conv


def _steps(model, masks, constants, steps=4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.05)
    if masks:
        attach_sgs(opt, masks, constant_kernels=constants)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(3, model.in_channels if isinstance(model, nn.Conv2d) else model.convs[0].in_channels, 8, 8,
                        generator=gen, dtype=torch.float64)
        opt.zero_grad()
        torch.tanh(model(x)).pow(2).mean().backward()
        opt.step()
        yield model


@settings(max_examples=examples(5))
@given(parallel_blocks())
def test_plain_conv_with_generic_mask_follows_the_branches(block):
    result = analyse(GenericAdapter(block))
    plain = _plain_conv(block, result)
    masks = {plain.weight: result.mask}
    if result.bias_mask is not None:
        masks[plain.bias] = result.bias_mask
    constants = {plain.weight: result.constant} if result.constant is not None else None
    start = result.weight.clone()
    worst = moved = 0.0
    for b, p in zip(_steps(block, None, None), _steps(plain, masks, constants)):
        with torch.no_grad():
            merged = GenericAdapter(b).kernel_module()()[0]
        moved = float((merged - start).abs().max())
        worst = max(worst, float((merged - p.weight.detach()).abs().max()) / float(merged.abs().max()))
    assert moved > 1e-4 and worst <= 1e-10
    if any(s != 1 for s in block.scales) or len(block.convs) > 1:  # negative control: the mask matters
        *_, final = _steps(_plain_conv(block, result), None, None)  # plain SGD, no mask
        assert float((merged - final.weight.detach()).abs().max()) > 1e-6


def test_jacobian_reduction_says_when_p_is_not_per_channel_pair():
    from reparam.sgs.jacobian import jacobian_reduction

    shared = torch.randn(1, 1, 3, 3, dtype=torch.float64)  # one kernel for every channel pair

    def merge(theta):
        return theta[0].expand(4, 2, 3, 3) * 1.0, torch.zeros(4, dtype=torch.float64)

    reduction = jacobian_reduction(merge, (shared,))
    assert reduction.weight is None and "mixes different channel pairs" in reduction.reason


def test_jacobian_reduction_per_pair_non_diagonal_is_not_reducible():
    from reparam.sgs.jacobian import jacobian_reduction

    theta = torch.randn(2, 2, 1, 1, dtype=torch.float64)
    spread = torch.stack([torch.full((3, 3), 1 / 9.0), torch.eye(3)], 0).double()  # per output channel

    def merge(t):
        weight = t[0] * spread[:, None]  # channel o spreads its one weight by its own pattern
        return weight, torch.zeros(2, dtype=torch.float64)

    reduction = jacobian_reduction(merge, (theta,))
    assert reduction.weight is None and "differs between channel pairs" in reduction.reason


def test_block_that_is_not_a_conv_is_a_clear_error():
    from reparam.errors import ConversionError

    block = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, dtype=torch.float64), nn.ReLU())
    with pytest.raises(ConversionError, match="not a conv"):
        analyse(GenericAdapter(block))
