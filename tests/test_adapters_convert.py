"""Conversion of timm models with their own branched blocks: convert_model nests nothing,
fuse_model equals timm's reparameterize_model, to_sgs keys masks by deploy names and states
exactness per layer; a model with nothing to convert warns, and the CLI exits 2 in one line."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from reparam import ReparamBlock, attach_sgs
from reparam.cli import main
from reparam.convert import (
    NothingToConvertWarning,
    convert_model,
    fuse_model,
    max_output_difference,
    read_mask_file,
    to_sgs,
)
from reparam.convert.workflow import randomized_copy

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def repvgg():
    return randomized_copy(timm.create_model("repvgg_a0", pretrained=False, num_classes=5).double(), 0)


def test_convert_model_never_nests_a_block_inside_a_timm_block(repvgg):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingToConvertWarning)  # the model has recognised blocks: no warning
        converted, report = convert_model(repvgg, "repvgg", "after", return_report=True)
    assert not report.converted
    assert not any(isinstance(m, ReparamBlock) for m in converted.modules())
    inside = [s for s in report.skipped if "inside the branched block" in s.reason]
    assert len(inside) == sum(isinstance(m, nn.Conv2d) for m in repvgg.modules())
    assert "timm RepVggBlock" in inside[0].reason


def test_fuse_model_equals_timm_reparameterize_model(repvgg):
    fused = fuse_model(repvgg, probe=torch.randn(2, 3, 32, 32, dtype=torch.float64), return_report=True)
    theirs = timm.utils.reparameterize_model(repvgg)
    assert len(fused.report.fused) == 22
    assert list(fused.model.state_dict()) == list(theirs.state_dict())
    worst = max(float((a - b).abs().max()) for a, b in zip(fused.model.state_dict().values(), theirs.state_dict().values()))
    assert worst <= 1e-12


def test_to_sgs_keys_masks_by_deploy_names_and_states_exactness(repvgg):
    sgs = to_sgs(repvgg, warn=False)
    theirs = timm.utils.reparameterize_model(repvgg)
    assert list(sgs.model.state_dict()) == list(theirs.state_dict())
    assert len(sgs.masks) == 22 and all(k.endswith(".reparam_conv.weight") for k in sgs.masks)
    assert all(not layer.exact and layer.bn == "branch" and "BatchNorm" in layer.reasons[0] for layer in sgs.report.layers)
    attach_sgs(torch.optim.SGD(theirs.parameters(), lr=0.1), sgs.masks, constant_kernels=sgs.constants, model=theirs)
    frozen = repvgg.eval().requires_grad_(False)
    for m in frozen.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert max_output_difference(frozen(x), sgs.model.eval()(x)) <= 1e-10 * float(frozen(x).abs().max())


def test_linear_timm_variant_is_exact_through_to_sgs():
    from timm.models import byobnet

    torch.manual_seed(0)
    model = randomized_copy(nn.Sequential(byobnet.RepVggBlock(4, 4), byobnet.RepVggBlock(4, 4)).double(), 0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval().requires_grad_(False)
    sgs = to_sgs(model)
    assert [layer.exact for layer in sgs.report.layers] == [True, True]
    assert sgs.report.layers[0].bn == "branch (eval)" and "per-channel mask" in sgs.report.layers[0].form


def test_nothing_to_convert_warns():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    for call in (lambda: convert_model(model), lambda: to_sgs(model), lambda: fuse_model(model)):
        with pytest.warns(NothingToConvertWarning, match="nothing to convert"):
            call()


@pytest.mark.parametrize("command", ["masks", "convert"])
def test_cli_nothing_to_convert_is_one_line_exit_2(tmp_path, capsys, monkeypatch, command):
    (tmp_path / "flatnets.py").write_text("import torch.nn as nn\ndef net():\n    return nn.Sequential(nn.Conv2d(3, 4, 1))\n")
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / ("m.safetensors" if command == "masks" else "run"))]
    assert main([command, "--model", "flatnets:net", *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("nothing to convert" in err[0] or "no masks" in err[0])


def test_cli_masks_labels_timm_blocks_honestly(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    assert main(["masks", "--model", "timm:repvgg_a0", "--block", "repvgg", "--bn", "after", "--out", str(path)]) == 0
    text = capsys.readouterr().out
    assert "[exact]" not in text and "exact," not in text.split("\n")[1]
    assert "22 timm RepVggBlock; SGS: 22 approximate" in text
    meta = read_mask_file(path).metadata
    assert meta["bn_used"] == {} and meta["outcome"] == "22 timm RepVggBlock; SGS: 22 approximate"
    layer = meta["layers"]["stem.reparam_conv.weight"]
    assert layer["bn"] == "branch" and layer["sgs"] == "approximate" and "BatchNorm" in layer["why"]
    json.dumps(meta)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobileone_s0", "fastvit_t8"])
def test_whole_timm_models_fuse_like_timm(name):
    model = randomized_copy(timm.create_model(name, pretrained=False, num_classes=5).double(), 0)
    sgs = to_sgs(model, warn=False)
    theirs = timm.utils.reparameterize_model(model)
    assert list(sgs.model.state_dict()) == list(theirs.state_dict())
    assert max(float((a - b).abs().max()) for a, b in zip(sgs.model.state_dict().values(),
                                                          theirs.state_dict().values())) <= 1e-12
    attach_sgs(torch.optim.SGD(theirs.parameters(), lr=0.1), sgs.masks, model=theirs)
