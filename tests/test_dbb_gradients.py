"""Training-mode gradients of DBB's BN-inside branches: autograd must agree with finite
differences, including through the padding ring that the sequential and average branches
fill with their first BatchNorm's zero response (a function of the batch statistics)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from reparam import DBBlock
from reparam.blocks import DBB_BRANCHES
from verification.strategies import BNState

GEOMETRIES = [
    dict(padding=1),
    dict(padding=(2, 0), stride=2),
    dict(padding=2, dilation=2, groups=2),
]


@pytest.mark.parametrize("branches", [("1x1_kxk",), ("1x1_avg",), DBB_BRANCHES], ids="+".join)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()))
def test_branch_bn_training_gradients_match_finite_differences(branches, geometry):
    torch.manual_seed(0)
    block = DBBlock(2, 2, 3, bn="branch", branches=branches, **geometry).double().train()
    BNState(seed=1)(block)  # non-trivial gamma and beta (their running statistics are unused in training)
    names = [n for n, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in block.parameters())
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)

    def forward(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return functional_call(block, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("branches", [("1x1_kxk",), ("1x1_avg",)], ids="+".join)
def test_padding_ring_is_the_zero_response_in_training_and_eval(branches, monkeypatch):
    """The forward the gradients are checked against: the ring equals the first BN's output for
    a zero input (batch statistics in training, running ones in eval), and eval still fuses."""
    torch.manual_seed(0)
    block = DBBlock(2, 2, 3, padding=1, bn="branch", branches=branches).double()
    BNState(seed=2)(block)
    bn = block.branches[branches[0]].first_bn
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    conv_inputs: list[torch.Tensor] = []
    real_conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda inp, *a, **k: conv_inputs.append(inp) or real_conv2d(inp, *a, **k))
    for training in (True, False):
        conv_inputs.clear()
        with torch.no_grad():
            block.train(training)(x)
        pre, padded = real_conv2d(x, block.branches[branches[0]].first, groups=1), conv_inputs[1]
        if training:
            var, mean = torch.var_mean(pre, dim=(0, 2, 3), unbiased=False)
        else:
            var, mean = bn.running_var, bn.running_mean
        zero_response = bn.bias - mean * bn.weight / torch.sqrt(var + bn.eps)
        ring = padded[:, :, 0, :]  # the top row of the KxK stage's input lies entirely in the padding
        torch.testing.assert_close(ring, zero_response.reshape(1, -1, 1).expand_as(ring), rtol=0, atol=1e-12)
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(block.eval().fuse()(x), block(x), rtol=0, atol=1e-10)
