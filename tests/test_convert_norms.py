"""BatchNorm kinds beyond nn.BatchNorm2d are absorbed (SyncBatchNorm, frozen BatchNorms, BN
subclasses whose forward is BN then more, such as timm's BatchNormAct2d), and a BatchNorm
placement that could not be honoured is never silent."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from reparam.cli import main
from reparam.convert import (
    BatchNormNotAbsorbedWarning,
    convert_model,
    find_conv_bn_pairs,
    fuse_model,
    read_mask_file,
    to_sgs,
)
from reparam.convert.norms import AbsorbedNorm
from reparam.convert.workflow import randomized_copy

timm = pytest.importorskip("timm")


def _mixed() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), FrozenBatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.SyncBatchNorm(4),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), timm.layers.BatchNormAct2d(4, act_layer=nn.SiLU),
    )
    with torch.no_grad():
        frozen = model[1]
        frozen.running_mean.normal_(), frozen.running_var.uniform_(0.5, 2), frozen.weight.normal_(), frozen.bias.normal_()
    return randomized_copy(model, 0).double().eval()


@pytest.mark.parametrize("bn", ["after", "branch"])
def test_sync_frozen_and_bn_act_are_absorbed_and_come_back(bn):
    model = _mixed()
    assert find_conv_bn_pairs(model).kinds == {"1": "frozen", "4": "sync", "6": "bn+rest"}
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every BN absorbed: nothing to warn about
        converted, report = convert_model(model, "acb", bn, example_input=x, return_report=True)
    assert [row.bn for row in report.converted] == [bn] * 3 and report.max_abs_diff < 1e-12
    assert isinstance(converted[6], AbsorbedNorm) and isinstance(converted[6].act, nn.SiLU)  # act stays after the block
    frozen_bn = converted[0].post_bn if bn == "after" else converted[0].branches["square"].bn
    assert isinstance(frozen_bn, FrozenBatchNorm2d)
    with torch.no_grad():
        converted[5].merged_kernel()  # folds through the absorbed BN part
        negative = fuse_model(converted)
        negative[6].act = nn.Identity()  # negative control: without the act the output differs
        assert float((negative(x) - model(x)).abs().max()) > 1e-3
    plain = to_sgs(converted, warn=False).model.eval()
    assert [type(plain[i]) for i in (1, 4, 6)] == [FrozenBatchNorm2d, nn.SyncBatchNorm, timm.layers.BatchNormAct2d]
    plain.load_state_dict(model.state_dict(), strict=True)


def test_timm_efficientnet_b0_absorbs_every_batchnorm_and_loads_strictly():
    original = timm.create_model("efficientnet_b0", num_classes=10)
    pairs = find_conv_bn_pairs(original)
    assert not any("users" in why for why in pairs.why_not.values())  # fx no longer traces into BatchNormAct2d
    converted, report = convert_model(original, "acb", "after", return_report=True)
    assert len(report.converted) == 17 and {row.bn for row in report.converted} == {"after"}  # before: 17x 'none'
    plain = to_sgs(converted).model
    plain.load_state_dict(original.state_dict(), strict=True)  # before: unexpected '...conv_dw.bias' keys


def test_efficientnet_output_preserved_in_float64():
    from timm.models.efficientnet import _gen_efficientnet  # efficientnet_b0's blocks, narrow and shallow

    torch.manual_seed(0)
    model = _gen_efficientnet("efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.25, num_classes=5)
    model = randomized_copy(model, 0).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    converted, report = convert_model(model, "repvgg", "after", example_input=x, return_report=True)
    assert {row.bn for row in report.converted} == {"after"}
    with torch.no_grad():
        reference = model(x)
        assert report.max_abs_diff <= 1e-10 * float(reference.abs().max())
        plain = to_sgs(converted).model.eval()
        assert float((plain(x) - reference).abs().max()) <= 1e-10 * float(reference.abs().max())


def test_bn_after_that_cannot_be_honoured_warns_per_layer_and_metadata_says_so(tmp_path, capsys):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.warns(BatchNormNotAbsorbedWarning) as caught:
        report = convert_model(model, "acb", "after").reparam_report
    messages = [str(w.message) for w in caught]
    assert any("'3' (ReLU)" in m and ": 2" in m for m in messages) and any("model's output: 4" in m for m in messages)
    assert report.placements() == {"0": "after", "2": "none", "4": "none"}
    assert report.bn_summary() == "bn='after' on 1 of 3 layers, 'none' on 2 (no BatchNorm absorbed)"
    module = tmp_path / "reparam_norms_net.py"
    module.write_text("from torch import nn\n\ndef net():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), "
                      "nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))\n")
    sys_path = __import__("sys").path
    sys_path.insert(0, str(tmp_path))
    try:
        out = tmp_path / "m.safetensors"
        assert main(["masks", "--model", "reparam_norms_net:net", "--bn", "after", "--out", str(out)]) == 0
    finally:
        sys_path.remove(str(tmp_path))
    captured = capsys.readouterr()
    assert captured.err.count("warning: convert_model: bn='after' asked") == 2 and "'none' on 2" in captured.out
    assert read_mask_file(out).metadata["bn_used"] == {"0": "after", "2": "none", "4": "none"}
    assert json.dumps(read_mask_file(out).metadata["bn_summary"]).count("none") == 1
