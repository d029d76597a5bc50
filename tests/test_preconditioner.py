"""The closed-form spatial preconditioner P = J J^T of linear blocks agrees with autograd
(``jacobian_preconditioner_apply``: J^T g by a vector-Jacobian product, then J by the merge)."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from reparam import SpatialPreconditioner
from verification.strategies import BlockFactory, ConvConfig, blocks, bn_states, conv_configs

configs = conv_configs(max_channels=4)
dbb_linear = st.tuples(configs, st.sampled_from(["none", "after"]), st.sampled_from(
    [("kxk", "1x1", "1x1_avg"), ("kxk", "1x1_avg"), ("1x1_avg",), ("1x1", "1x1_avg"), ("kxk", "1x1")]
)).map(lambda t: (BlockFactory("dbb", t[0], t[1], dbb_branches=t[2]), t[0]))


def jacobian_preconditioner_apply(merge, params: list[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    """``J J^T g`` for a merge ``W = merge(*params)`` linear in ``params``, by autograd: ``J^T g``
    is a vector-Jacobian product, and ``J v = merge(v) - merge(0)`` (the merge is linear)."""
    params = [p.detach().requires_grad_(True) for p in params]
    weight = merge(*params)
    vjp = torch.autograd.grad(weight, params, grad_outputs=grad)
    constant = merge(*[torch.zeros_like(p) for p in params])
    return merge(*vjp) - constant


linear_blocks = st.one_of(
    blocks(block_types=("acb", "repvgg"), bn=("none", "after"), configs=configs, states=bn_states()),
    dbb_linear,
)


class _Merge(nn.Module):
    """``forward()`` = the block's trainable (pre-BN) merged kernel."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self) -> torch.Tensor:
        return self.block.merged_kernel(post_bn=False)[0]


def merge_of(block):
    names = [f"block.branches.{n}" for n, _ in block.branches.named_parameters()]
    module = _Merge(block)

    def merge(*params):
        return functional_call(module, dict(zip(names, params)), ())

    return merge, [p for _, p in block.branches.named_parameters()]


@given(drawn=linear_blocks, seed=st.integers(0, 2**16))
def test_closed_form_matches_autograd(drawn, seed):
    factory, config = drawn
    torch.manual_seed(seed)
    block = factory().double()
    merge, params = merge_of(block)
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(block.geometry.weight_shape, generator=gen, dtype=torch.float64)
    reference = jacobian_preconditioner_apply(merge, params, grad)
    closed = SpatialPreconditioner(block.spatial_preconditioner()).apply_(grad.clone())
    assert closed.shape == reference.shape
    torch.testing.assert_close(closed, reference, rtol=0, atol=1e-12)
    assert not torch.equal(reference, torch.zeros_like(reference))


@given(drawn=blocks(block_types=("acb", "repvgg"), bn=("none", "after"), configs=configs), seed=st.integers(0, 2**16))
def test_mask_blocks_autograd_preconditioner_is_elementwise_mask(drawn, seed):
    """For mask blocks J J^T g = G ⊙ g exactly (each tap is the sum of the branches covering it)."""
    factory, config = drawn
    torch.manual_seed(seed)
    block = factory().double()
    merge, params = merge_of(block)
    grad = torch.randn(block.geometry.weight_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    reference = jacobian_preconditioner_apply(merge, params, grad)
    torch.testing.assert_close(reference, block.sgs_mask().double() * grad, rtol=0, atol=1e-13)


def test_autograd_reference_sees_the_average_branch_coupling():
    """DBB's average branch couples all taps: P g differs from diag(G') g by mean(g) / K^2."""
    torch.manual_seed(0)
    block = BlockFactory("dbb", ConvConfig(3, 2, (3, 3)), "none", dbb_branches=("kxk", "1x1", "1x1_avg"))().double()
    merge, params = merge_of(block)
    grad = torch.randn(block.geometry.weight_shape, dtype=torch.float64)
    reference = jacobian_preconditioner_apply(merge, params, grad)
    g_prime = torch.ones(3, 3, dtype=torch.float64)
    g_prime[1, 1] = 2
    coupling = grad.sum((-2, -1), keepdim=True) / 81
    torch.testing.assert_close(reference, g_prime * grad + coupling, rtol=0, atol=1e-13)

