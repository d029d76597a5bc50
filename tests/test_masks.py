"""Exact SGS masks, constant kernels and spatial preconditioners of the known blocks."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given

import reparam
from reparam import ACBlock, DBBlock, RepVGGBlock
from verification.strategies import blocks, conv_configs


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("bn", ["none", "after", "branch"])
def test_acb_3x3_mask(bn):
    assert torch.equal(ACBlock(2, 2, 3, bn=bn).sgs_mask(), t([[1, 2, 1], [2, 3, 2], [1, 2, 1]]))


@pytest.mark.parametrize("bn", ["none", "after", "branch"])
def test_repvgg_3x3_mask(bn):
    assert torch.equal(RepVGGBlock(2, 2, 3, bn=bn).sgs_mask(), t([[1, 1, 1], [1, 2, 1], [1, 1, 1]]))


def test_acb_5x3_mask():
    expected = t([[1, 2, 1], [1, 2, 1], [2, 3, 2], [1, 2, 1], [1, 2, 1]])
    assert torch.equal(ACBlock(3, 2, (5, 3)).sgs_mask(), expected)


def test_acb_1x1_mask():
    assert torch.equal(ACBlock(3, 2, 1).sgs_mask(), t([[1]]))  # 1x1: no copies of the square branch


@pytest.mark.parametrize("in_out_stride", [(4, 4, 1), (4, 6, 1), (4, 4, 2)])
def test_repvgg_5x5_mask(in_out_stride):
    """The identity branch (present only for in == out, stride 1) never adds to the mask."""
    cin, cout, stride = in_out_stride
    expected = torch.ones(5, 5)
    expected[2, 2] = 2
    assert torch.equal(RepVGGBlock(cin, cout, 5, stride=stride).sgs_mask(), expected)


@pytest.mark.parametrize(
    "branches, label",
    [
        (("kxk", "1x1", "1x1_kxk", "1x1_avg"), "1x1-kxk"),
        (("kxk", "1x1", "1x1_kxk"), "1x1-kxk"),
        (("kxk", "1x1", "1x1_avg"), "1x1-avg"),
        (("1x1_avg",), "1x1-avg"),
    ],
)
def test_dbb_mask_raises_naming_the_branch(branches, label):
    block = DBBlock(4, 4, 3, bn="none", branches=branches)
    with pytest.raises(reparam.NotMaskEquivalent) as info:
        block.sgs_mask()
    assert isinstance(info.value, ValueError)
    assert label in str(info.value)
    exact, reasons = block.sgs_exactness()
    assert not exact and any(label in r for r in reasons)


def test_dbb_approximate_mask():
    """Mask-sum of the SGS paper: KxK + 1x1 centre + the full window for each non-mask branch."""
    expected = torch.full((3, 3), 3.0)
    expected[1, 1] = 4
    assert torch.equal(DBBlock(4, 4, 3).sgs_mask(approximate=True), expected)
    expected = torch.full((3, 5), 2.0)
    expected[1, 2] = 3
    assert torch.equal(DBBlock(4, 4, (3, 5), branches=("kxk", "1x1", "1x1_avg")).sgs_mask(approximate=True), expected)


def test_mask_only_dbb_subset_is_exact():
    block = DBBlock(4, 4, 3, bn="none", branches=("kxk", "1x1"))
    assert torch.equal(block.sgs_mask(), t([[1, 1, 1], [1, 2, 1], [1, 1, 1]]))
    assert block.sgs_exactness() == (True, [])


@given(drawn=blocks(block_types=("acb", "repvgg")))
def test_branch_masks_are_binary_and_sum_to_the_mask(drawn):
    factory, config = drawn
    block = factory()
    masks = block.branch_masks()
    assert masks, "a mask block has at least one trainable branch"
    for m in masks:
        assert tuple(m.shape) == config.kernel_size
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert m[config.kernel_size[0] // 2, config.kernel_size[1] // 2] == 1  # every branch covers the centre
    assert torch.equal(torch.stack(masks).sum(0), block.sgs_mask())
    # the full-window branch is always there: G >= 1 everywhere
    assert block.sgs_mask().min() >= 1


@given(drawn=blocks(block_types=("dbb",)))
def test_dbb_approximate_branch_masks_are_binary(drawn):
    factory, config = drawn
    for m in factory().branch_masks(approximate=True):
        assert set(m.unique().tolist()) <= {0.0, 1.0}


# -- constant kernels ------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_repvgg_constant_kernel_is_the_identity(groups):
    block = RepVGGBlock(4, 4, 3, groups=groups, bn="none")
    c = block.constant_kernel()
    assert c.shape == (4, 4 // groups, 3, 3)
    expected = torch.zeros_like(c)
    for ch in range(4):
        expected[ch, ch % (4 // groups), 1, 1] = 1
    assert torch.equal(c, expected)
    # the identity kernel as a conv is the identity map
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(torch.nn.functional.conv2d(x, c, padding=1, groups=groups), x)


def test_repvgg_constant_kernel_non_square():
    c = RepVGGBlock(2, 2, (3, 5), bn="after").constant_kernel()
    expected = torch.zeros(2, 2, 3, 5)
    expected[0, 0, 1, 2] = expected[1, 1, 1, 2] = 1
    assert torch.equal(c, expected)


@pytest.mark.parametrize(
    "block",
    [
        RepVGGBlock(4, 4, 3, bn="branch"),  # identity through its own BN: trainable, not constant
        RepVGGBlock(4, 6, 3, bn="none"),  # no identity
        RepVGGBlock(4, 4, 3, stride=2, bn="none"),
        ACBlock(4, 4, 3, bn="none"),
        DBBlock(4, 4, 3, bn="none"),
    ],
    ids=repr,
)
def test_constant_kernel_zero(block):
    c = block.constant_kernel()
    assert c.shape == block.geometry.weight_shape
    assert torch.equal(c, torch.zeros_like(c))


# -- spatial preconditioners ------------------------------------------------------------------
@given(drawn=blocks(block_types=("acb", "repvgg"), bn=("none", "after")))
def test_mask_block_preconditioner_is_diag_of_mask(drawn):
    factory, _ = drawn
    block = factory()
    p = block.spatial_preconditioner()
    assert p.dtype == torch.float64
    assert torch.equal(p, torch.diag(block.sgs_mask().flatten().double()))


@given(config=conv_configs(max_channels=4))
def test_dbb_linear_preconditioner_closed_form(config):
    block = DBBlock(**config.kwargs(), bn="none", branches=("kxk", "1x1", "1x1_avg"))
    kh, kw = config.kernel_size
    n = kh * kw
    g_prime = torch.ones(kh, kw, dtype=torch.float64)
    g_prime[kh // 2, kw // 2] = 2
    expected = torch.diag(g_prime.flatten()) + torch.ones(n, n, dtype=torch.float64) / n**2
    assert torch.allclose(block.spatial_preconditioner(), expected, rtol=0, atol=1e-15)


def test_dbb_3x3_preconditioner_value():
    p = DBBlock(2, 2, 3, bn="after", branches=("kxk", "1x1", "1x1_avg")).spatial_preconditioner()
    assert p[4, 4].item() == pytest.approx(2 + 1 / 81, abs=1e-15)
    assert p[0, 0].item() == pytest.approx(1 + 1 / 81, abs=1e-15)
    assert p[0, 8].item() == pytest.approx(1 / 81, abs=1e-15)


@pytest.mark.parametrize(
    "block, label",
    [
        (DBBlock(4, 4, 3, bn="none"), "1x1-kxk"),
        (ACBlock(4, 4, 3, bn="branch"), "BatchNorm"),
        (DBBlock(4, 4, 3, bn="branch", branches=("kxk", "1x1_avg")), "BatchNorm"),
    ],
    ids=repr,
)
def test_preconditioner_raises_for_nonlinear_blocks(block, label):
    with pytest.raises(reparam.NotMaskEquivalent, match=label):
        block.spatial_preconditioner()
