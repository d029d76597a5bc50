"""Conversions keep what the user set: requires_grad per parameter, train/eval mode per module,
bias-free convs (so the original checkpoint loads strictly into the plain SGS model)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reparam.blocks import ReparamBlock
from reparam.convert import convert_model, fuse_model, to_sgs
from reparam.sgs import attach_sgs


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double()


def _kernel_params(block: ReparamBlock) -> list[nn.Parameter]:
    in_bn = {id(p) for m in block.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    return [p for p in block.branches.parameters() if id(p) not in in_bn]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("bn", ["after", "branch"])
def test_frozen_conv_stays_frozen_and_gets_no_mask(bn):
    net = _net()
    net[0].weight.requires_grad_(False)
    branched = convert_model(net, "acb", bn).train()
    assert not any(p.requires_grad for p in _kernel_params(branched[0]))
    assert all(p.requires_grad for p in _kernel_params(branched[3]))  # negative control: the other layer trains
    sgs = to_sgs(branched, warn=False)
    assert set(sgs.masks) == {"3.weight"} and [l.weight for l in sgs.report.frozen] == ["0.weight"]
    plain = sgs.model
    assert not plain[0].weight.requires_grad and plain[3].weight.requires_grad
    start, other = plain[0].weight.detach().clone(), plain[3].weight.detach().clone()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    attach_sgs(opt, sgs.masks, model=plain)
    _train(plain, opt)
    assert torch.equal(plain[0].weight, start)  # before: moved by 0.018 (9.6% of its largest entry) in 3 steps
    assert not torch.equal(plain[3].weight, other)
    fused = fuse_model(branched)
    assert not fused[0].weight.requires_grad and fused[3].weight.requires_grad


@pytest.mark.parametrize("bn", ["after", "branch"])
def test_eval_mode_batchnorm_stays_eval_through_every_conversion(bn):
    net = _net().train()
    net[1].eval()  # frozen statistics: the fine-tuning norm
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    branched = convert_model(net, "acb", bn, example_input=x)
    assert branched.training and branched[0].training
    bns = [m for m in branched[0].modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(m.training for m in branched[3].modules() if isinstance(m, nn.BatchNorm2d))  # negative control
    plain = to_sgs(branched, warn=False).model
    assert plain.training and not plain[1].training and plain[4].training
    running = plain[1].running_mean.clone()
    plain(x)
    assert torch.equal(plain[1].running_mean, running)
    fused = fuse_model(branched)
    assert fused.training and fused[0].training


def test_frozen_batchnorm_affine_stays_frozen():
    net = _net()
    net[1].weight.requires_grad_(False)
    net[1].bias.requires_grad_(False)
    after = convert_model(net, "acb", "after")
    assert not after[0].post_bn.weight.requires_grad and not after[0].post_bn.bias.requires_grad
    assert after[3].post_bn.weight.requires_grad
    plain = to_sgs(after).model
    assert not plain[1].weight.requires_grad and not plain[1].bias.requires_grad and plain[4].weight.requires_grad
    branch = convert_model(net, "acb", "branch")
    assert not any(p.requires_grad for m in branch[0].modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    plain = to_sgs(branch, warn=False).model
    assert not plain[1].weight.requires_grad


def _densenet() -> nn.Module:
    torch.manual_seed(0)  # torchvision's DenseNet, small: BN before conv, so conv2 absorbs no BN and has no bias
    return torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                       num_classes=5).double()


def test_bias_free_conv_stays_bias_free_and_the_original_checkpoint_loads_strictly():
    original = _densenet()
    branched = convert_model(original, "acb", "after").train()
    block = branched.features.denseblock1.denselayer1.conv2
    assert block.bn == "none" and not block.bias.requires_grad
    sgs = to_sgs(branched)
    plain = sgs.model
    assert plain.features.denseblock1.denselayer1.conv2.bias is None
    plain.load_state_dict(original.state_dict(), strict=True)  # before: missing '...conv2.bias' keys
    assert set(plain.state_dict()) == set(original.state_dict())
    opt_b = torch.optim.SGD(branched.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    plain = to_sgs(branched).model.train()  # the loaded checkpoint replaced the converted weights above
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    attach_sgs(opt_p, sgs.masks, model=plain)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = torch.randn(8, 3, 16, 16, dtype=torch.float64, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        for model, opt in ((branched, opt_b), (plain, opt_p)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    merged, bias = block.merged_kernel(post_bn=False)
    weight = plain.features.denseblock1.denselayer1.conv2.weight
    with torch.no_grad():
        assert float((merged - weight).abs().max() / weight.abs().max()) < 1e-10 and not bias.any()
