"""Properties of fusion: a block in eval mode is exactly its fused conv, the merged-mode
forward is exactly the branched forward, and merged_kernel is differentiable."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import F64_TOL, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reparam import ACBlock, DBBlock, RepVGGBlock
from verification.strategies import BNState, blocks, bn_states, conv_configs, examples

#: fusion must hold for every valid geometry, including over-padded ones
any_block = blocks(configs=conv_configs(over_padding=True), states=bn_states())

def make_input(config, batch: int, seed: int, dtype=torch.float64, channels_last: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, *config.input_size, generator=gen, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@given(
    drawn=any_block,
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    channels_last=st.booleans(),
)
def test_eval_output_equals_fused_conv(drawn, batch, seed, channels_last):
    factory, config = drawn
    torch.manual_seed(seed)
    block = factory().double().eval()
    x = make_input(config, batch, seed, channels_last=channels_last)
    fused = block.fuse()
    assert isinstance(fused, nn.Conv2d)
    assert fused.weight.dtype == torch.float64
    assert fused.weight.shape == (config.out_channels, config.in_channels // config.groups, *config.kernel_size)
    assert (fused.stride, fused.dilation, fused.groups) == (config.stride, config.dilation, config.groups)
    with torch.no_grad():
        expected = block(x)
        actual = fused(x)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) <= F64_TOL


@given(drawn=blocks(bn=("none", "after"), configs=conv_configs(over_padding=True), states=bn_states()),
       seed=st.integers(0, 2**16))
def test_sgs_counterpart_computes_the_block(drawn, seed):
    """The plain layer SGS trains computes the block's function (eval mode)."""
    factory, config = drawn
    torch.manual_seed(seed)
    block = factory().double().eval()
    counterpart = block.sgs_counterpart().eval()
    x = make_input(config, 2, seed)
    with torch.no_grad():
        assert rel_err(counterpart(x), block(x)) <= F64_TOL


@given(
    drawn=blocks(bn=("none", "after"), configs=conv_configs(over_padding=True), states=bn_states()),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
    channels_last=st.booleans(),
)
def test_merged_mode_equals_branched_mode(drawn, train, seed, channels_last):
    factory, config = drawn
    torch.manual_seed(seed)
    branched = factory().double().train(train)
    merged = copy.deepcopy(branched)
    merged.mode = "merged"
    x = make_input(config, 3, seed, channels_last=channels_last)
    out_b, out_m = branched(x), merged(x)
    assert out_m.shape == out_b.shape
    assert rel_err(out_m, out_b) <= F64_TOL
    # the same backward: gradients of every parameter agree
    target = torch.randn(out_b.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    (torch.tanh(out_b) * target).sum().backward()
    (torch.tanh(out_m) * target).sum().backward()
    for (name, pb), (_, pm) in zip(branched.named_parameters(), merged.named_parameters()):
        assert pm.grad is not None, name
        assert rel_err(pm.grad, pb.grad) <= 1e-9, name
    if train and branched.post_bn is not None:  # running statistics updated identically
        assert rel_err(merged.post_bn.running_var, branched.post_bn.running_var) <= F64_TOL


@given(drawn=blocks(states=bn_states()), seed=st.integers(0, 2**16))
def test_merged_kernel_is_differentiable_in_every_parameter(drawn, seed):
    factory, config = drawn
    torch.manual_seed(seed)
    block = factory().double().eval()
    weight, bias = block.merged_kernel(post_bn=True)
    gen = torch.Generator().manual_seed(seed)
    loss = (weight * torch.randn(weight.shape, generator=gen, dtype=torch.float64)).sum()
    if bias is not None:
        loss = loss + (bias * torch.randn(bias.shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient at {name}"


@given(drawn=blocks(states=bn_states()), seed=st.integers(0, 2**16))
@settings(max_examples=examples(15))
def test_float32_fusion(drawn, seed):
    factory, config = drawn
    torch.manual_seed(seed)
    block = factory().float().eval()
    fused = block.fuse()
    assert fused.weight.dtype == torch.float32 and fused.bias.dtype == torch.float32
    x = make_input(config, 2, seed, dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(fused(x), block(x)) <= 1e-5
    # fuse() computes in float64: its kernel is the float64 fusion rounded once
    ref_w, ref_b = copy.deepcopy(block).double().merged_kernel(post_bn=True)
    assert rel_err(fused.weight, ref_w) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [ACBlock, RepVGGBlock, DBBlock])
@pytest.mark.parametrize("bn", ["branch", "after", "none"])
def test_low_precision_fuse_keeps_dtype(cls, bn, dtype):
    torch.manual_seed(0)
    block = cls(4, 4, 3, bn=bn)
    BNState(seed=1)(block)
    reference = copy.deepcopy(block).double().eval()
    block = block.to(dtype).eval()
    fused = block.fuse()
    assert isinstance(fused, nn.Conv2d)
    assert fused.weight.dtype == dtype and fused.bias.dtype == dtype
    ref_w, ref_b = reference.merged_kernel(post_bn=True)
    # block parameters were rounded to dtype once, the fusion (in float64) rounds once more
    assert rel_err(fused.weight, ref_w) <= 3e-2
    assert rel_err(fused.bias, ref_b) <= 3e-2


def test_fusion_of_known_repvgg_kernel():
    """A hand-checked case: RepVGG 3x3, bn='none', unit weights -> every tap 1, centre 1+1+identity."""
    block = RepVGGBlock(2, 2, 3, bn="none").double()
    with torch.no_grad():
        for p in block.parameters():
            p.fill_(1.0)
    weight, bias = block.merged_kernel()
    expected = torch.ones(2, 2, 3, 3, dtype=torch.float64)
    expected[:, :, 1, 1] = 2.0
    expected[0, 0, 1, 1] = expected[1, 1, 1, 1] = 3.0
    assert torch.equal(weight, expected)
    assert torch.equal(bias, torch.ones(2, dtype=torch.float64))
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert rel_err(block.fuse()(x), F.conv2d(x, expected, bias, padding=1)) <= F64_TOL
