"""timm's branched blocks: fused conv equal to timm's own reparameterize(), deploy names, masks
that load into the model people deploy, and exact trajectories for linear variants."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reparam import attach_sgs
from reparam.adapters import find_blocks, fuse_foreign, recognise, to_sgs_foreign
from reparam.convert import max_output_difference
from reparam.convert.workflow import randomized_copy

timm = pytest.importorskip("timm")
from timm.models import byobnet, fastvit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics/affine parameters (a fresh BN is the identity in eval mode)."""
    return randomized_copy(model, seed)


def small_blocks() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "repvgg": byobnet.RepVggBlock(6, 6),
        "repvgg-s2-grouped": byobnet.RepVggBlock(6, 12, stride=2, group_size=3),
        "mobileone-byob": byobnet.MobileOneBlock(6, 6, num_conv_branches=3, group_size=1),
        "mobileone-byob-1x1": byobnet.MobileOneBlock(6, 10, kernel_size=1, num_conv_branches=2),
        "mobileone-fastvit": fastvit.MobileOneBlock(6, 6, 3, num_conv_branches=2, group_size=1),
        "large-kernel": fastvit.ReparamLargeKernelConv(6, 6, 7, 1, group_size=1, small_kernel=3),
        "repmixer": fastvit.RepMixer(6, 3, layer_scale_init_value=0.5),
    }


@pytest.mark.parametrize("key", list(small_blocks()))
def test_fused_block_equals_timm_reparameterize(key):
    block = randomize(small_blocks()[key].double())
    model = nn.Sequential(block)
    ours, layers = fuse_foreign(model)
    theirs = timm.utils.reparameterize_model(model)
    assert [layer.weight for layer in layers] == ["0.reparam_conv.weight"]
    assert list(ours.state_dict()) == list(theirs.state_dict())  # the deploy model's own names
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    assert max_output_difference(model.eval()(x), ours.eval()(x)) <= 1e-12
    assert float((ours.state_dict()["0.reparam_conv.weight"] - model[0].state_dict()[
        next(k for k in model[0].state_dict() if k.endswith("conv.weight"))]).abs().max()) > 0  # something fused


def test_train_mode_blocks_are_approximate_with_reason():
    block = small_blocks()["repvgg"].double()
    layer = to_sgs_foreign(nn.Sequential(block)).layers[0]
    assert not layer.analysis.exact and "BatchNorm" in layer.analysis.reasons[0]
    assert torch.equal(layer.analysis.mask, torch.tensor([[1.0, 1, 1], [1, 2, 1], [1, 1, 1]], dtype=torch.float64))
    mixer = to_sgs_foreign(nn.Sequential(small_blocks()["repmixer"].double().eval())).layers[0].analysis
    assert not mixer.exact and "not linear" in mixer.reasons[0]  # layer scale times conv kernel


def _linear_variant(block: nn.Module, how: str) -> nn.Module:
    """The same block with its BNs frozen in eval mode, or removed (conv branches) / the identity."""
    for name, m in list(block.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if how == "frozen":
                m.eval().requires_grad_(False)
            else:
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, leaf, nn.Identity())
    return block


def _fused(block: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return recognise(block).kernel_module()()[0]


def _train(model: nn.Module, masks=None, constants=None, steps: int = 5, seed: int = 0):
    """SGD (momentum, coupled weight decay) on fixed random batches; yields the model after each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    if masks is not None:
        attach_sgs(opt, masks, constant_kernels=constants, model=model)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 6, 8, 8, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        (torch.tanh(model(x)) - 0.3).pow(2).mean().backward()
        opt.step()
        yield model


@pytest.mark.parametrize("how", ["frozen", "removed"])
def test_linear_variant_trains_identically(how):
    torch.manual_seed(1)
    branched = nn.Sequential(byobnet.RepVggBlock(6, 6), byobnet.MobileOneBlock(6, 6, num_conv_branches=2))
    branched = _linear_variant(randomize(branched.double()), how)
    sgs = to_sgs_foreign(branched)
    assert all(layer.analysis.exact for layer in sgs.layers), [layer.analysis.reasons for layer in sgs.layers]
    assert set(sgs.masks) >= {"0.reparam_conv.weight", "1.reparam_conv.weight"}
    if how == "removed":  # binary masks, the identity as constant kernel
        assert torch.equal(sgs.masks["0.reparam_conv.weight"], torch.tensor([[1.0, 1, 1], [1, 2, 1], [1, 1, 1]],
                                                                             dtype=torch.float64))
        assert "0.reparam_conv.weight" in sgs.constants
    else:  # frozen BN scales: G = sum_n s_n^2 M_n per output channel, bias frozen
        assert sgs.masks["0.reparam_conv.weight"].shape == (6, 1, 3, 3)
        assert not sgs.model.get_parameter("0.reparam_conv.bias").requires_grad
    wrong = {k: torch.ones_like(v) for k, v in sgs.masks.items()}
    runs = zip(_train(branched), _train(sgs.model, sgs.masks, sgs.constants),
               _train(copy.deepcopy(to_sgs_foreign(branched).model), wrong, sgs.constants))
    moved = worst = control = 0.0
    start = _fused(branched[0]).clone()
    for b, p, w in runs:
        ref = _fused(b[0])
        scale = float(ref.abs().max())
        moved = float((ref - start).abs().max())
        worst = max(worst, float((ref - p[0].reparam_conv.weight).abs().max()) / scale)
        control = max(control, float((ref - w[0].reparam_conv.weight).abs().max()) / scale)
    assert moved > 1e-3  # the weights did move
    assert worst <= 1e-12
    assert control > 1e-4  # a wrong mask diverges


def test_nothing_nested_inside_a_recognised_block():
    model = nn.Sequential(fastvit.RepMixer(6, 3), byobnet.RepVggBlock(6, 6))
    names = [name for name, _ in find_blocks(model)]
    assert names == ["0", "1"]  # RepMixer's inner MobileOneBlocks are part of it, not blocks of their own


def test_timm_spec_with_literal_kwargs():
    from reparam.convert import load_model

    model = load_model("timm:repvgg_a0?num_classes=7&drop_rate=0.0&global_pool='avg'")
    assert type(model).__name__ == "ByobNet" and model.num_classes == 7
    assert len(find_blocks(model)) == 22


@pytest.mark.parametrize("spec, words", [
    ("timm:no_such_net", "timm has no model"),
    ("timm:repvgg_a0?num_classes", "key=value"),
    ("timm:repvgg_a0?pretrained=True", "never downloaded"),
    ("timm:repvgg_a0?bogus_arg=1", "rejected"),
])
def test_bad_timm_specs_are_one_line_errors(spec, words):
    from reparam.convert import load_model
    from reparam.errors import ConversionError

    with pytest.raises(ConversionError, match=words) as info:
        load_model(spec)
    assert "\n" not in str(info.value)


def test_timm_spec_without_timm(monkeypatch):
    import sys

    from reparam.convert import load_model
    from reparam.errors import ConversionError

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ConversionError, match="needs timm, which is not installed"):
        load_model("timm:repvgg_a0")


def test_core_import_does_not_import_timm():
    import subprocess
    import sys

    code = "import sys, reparam, reparam.adapters, reparam.convert; print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_repvgg_a0_fuses_like_timm_and_masks_load_into_the_deployed_model():
    model = randomize(timm.create_model("repvgg_a0", pretrained=False, num_classes=5).double())
    sgs = to_sgs_foreign(model)
    theirs = timm.utils.reparameterize_model(model)
    assert list(sgs.model.state_dict()) == list(theirs.state_dict())
    worst = max(float((a - b).abs().max()) for a, b in zip(sgs.model.state_dict().values(), theirs.state_dict().values()))
    assert worst <= 1e-12
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert max_output_difference(model.eval()(x), sgs.model.eval()(x)) <= 1e-10 * float(model(x).abs().max())
    assert len(sgs.layers) == 22 and all(name.endswith(".reparam_conv.weight") for name in sgs.masks)
    assert all(not layer.analysis.exact and "BatchNorm" in layer.analysis.reasons[0] for layer in sgs.layers)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    handle = attach_sgs(opt, sgs.masks, constant_kernels=sgs.constants, model=theirs)
    assert len(handle.parameters) == 22
