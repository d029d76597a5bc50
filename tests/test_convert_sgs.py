"""Full loop on resnet18: branched training == to_sgs plain model + attach_sgs, step by step."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reparam.blocks import ACBlock, ReparamBlock
from reparam.convert import ConvBN, convert_model, to_sgs
from reparam.sgs import NotEquivalentWarning, attach_sgs
from verification.lockstep import Side, deviation, movement, run_lockstep, snapshot, worst

STEPS = 10
# At 16x16, resnet18's layer3/layer4 maps are 1x1, so each BatchNorm normalizes BATCH numbers
# per channel; with batch 4 that is so ill-conditioned that float64 rounding (1e-16 at step 1)
# grows ~10x per step on *any* two runs that differ only in summation order. Batch 16 keeps
# the amplification well inside the 1e-10 tolerance.
BATCH = 16


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).double()


def _loop(block: str, make_opt, attach: dict | None, steps: int = STEPS) -> float:
    """Train the branched model and its SGS form on identical data; return the worst relative
    difference between each block's merged (pre-BN) kernel and the plain conv, over all steps
    (after checking that the kernels really moved)."""
    branched = convert_model(_resnet18(), block, "after").train()
    sgs = to_sgs(branched)
    plain, masks, constants = sgs
    assert not sgs.report.approximate
    blocks = [branched.get_submodule(l.block_name) for l in sgs.report.layers]
    weights = [plain.get_parameter(l.weight) for l in sgs.report.layers]
    assert len(blocks) == 17
    sides = [Side("branched", branched, make_opt(branched.parameters())), Side("plain", plain, make_opt(plain.parameters()))]
    if attach is not None:
        attach_sgs(sides[1].optimizer, masks, constant_kernels=constants, model=plain, **attach)
    start = snapshot(weights)
    gen = torch.Generator().manual_seed(1)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(BATCH, 3, 16, 16, dtype=torch.float64, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)

    def observe(step: int) -> dict:
        with torch.no_grad():
            merged = [blk.merged_kernel(post_bn=False)[0] for blk in blocks]
        return {"rel": deviation(merged, weights, per_tensor=True)[1]}

    rows = run_lockstep(sides, batch, lambda model, b: F.cross_entropy(model(b[0]), b[1]), steps, observe)
    assert movement(start, weights)[1] > 1e3 * 1e-10, "the kernels must move far beyond the tolerance"
    return worst(row["rel"] for row in rows)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-3)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)


@pytest.mark.parametrize("block", ["acb", "repvgg"])  # repvgg: constant identity kernels + weight decay
def test_sgd_momentum_weight_decay_exact(block):
    assert _loop(block, _sgd, {}) <= 1e-10


def test_adamw_update_mode_exact():
    assert _loop("acb", _adamw, {"mode": "update"}) <= 1e-10


def test_negative_controls_diverge():
    assert _loop("acb", _sgd, None, steps=2) > 1e-6  # no masks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotEquivalentWarning)
        assert _loop("acb", _adamw, {"mode": "grad", "strict": False}, steps=2) > 1e-6  # wrong mode


def test_to_sgs_keeps_original_names_and_function():
    branched = convert_model(_resnet18(), "repvgg", "after").eval()
    plain, masks, constants = sgs = to_sgs(branched)
    reference = torchvision.models.resnet18(num_classes=10).double()
    assert set(dict(plain.named_parameters())) == set(dict(reference.named_parameters()))
    assert set(masks) == {f"{l.block_name}.weight" for l in sgs.report.layers}
    assert "layer1.0.conv1.weight" in constants and "layer2.0.conv1.weight" not in constants  # stride 2: no identity
    assert torch.equal(masks["layer1.0.conv1.weight"], torch.tensor([[1.0, 1, 1], [1, 2, 1], [1, 1, 1]], dtype=torch.float64))
    assert not any(isinstance(m, ReparamBlock) for m in plain.modules())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        a, b = branched(x), plain.eval()(x)
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-10
    assert isinstance(branched.layer1[0].conv1, ReparamBlock)  # to_sgs worked on a copy


def test_approximate_layers_are_reported_not_silent():
    branched = convert_model(_resnet18(), "dbb", "after", include=["layer1.0.*"])
    with pytest.warns(NotEquivalentWarning, match="approximately"):
        sgs = to_sgs(branched)
    assert len(sgs.report.approximate) == 2
    assert any("1x1-kxk" in reason for reason in sgs.report.approximate[0].reasons)
    assert "APPROXIMATE" in str(sgs.report)
    branched = convert_model(_resnet18(), "acb", "branch", include=["conv1"])
    with pytest.warns(NotEquivalentWarning):
        sgs = to_sgs(branched)
    assert "BatchNorm inside each branch" in sgs.report.approximate[0].reasons[0]


def test_blocks_not_from_convert_model_get_conv_bn_wrapper():
    torch.manual_seed(0)
    net = nn.Sequential(ACBlock(3, 4, 3, bn="after"), nn.ReLU(), ACBlock(4, 4, 3, bn="none")).double().eval()
    plain, masks, constants = to_sgs(net)
    assert isinstance(plain[0], ConvBN)
    assert set(masks) == {"0.conv.weight", "2.weight"} and constants == {}
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(net(x), plain(x), rtol=1e-12, atol=1e-12)
