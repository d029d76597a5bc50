"""``reparam convert`` and ``reparam masks`` end to end, and model-spec resolution."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from reparam.cli import main
from reparam.convert import load_masks, load_model
from reparam.errors import ConversionError

TINY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def tiny_net():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        )

    not_a_model = 42
    """
)


@pytest.fixture()
def tiny_module(model_module):
    return model_module(TINY)


@pytest.mark.parametrize("block,bn", [("acb", "after"), ("dbb", "branch")])
def test_convert_tiny_net(tiny_module, tmp_path, capsys, block, bn):
    out = tmp_path / "out"
    rc = main(["convert", "--model", f"{tiny_module}:tiny_net", "--block", block, "--bn", bn,
               "--out", str(out), "--input-size", "8"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary["converted"] == 2 and summary["skipped"] == 1
    assert summary["max_abs_diff_fused_vs_branched"] < 1e-5
    assert summary["max_abs_diff_branched_vs_original"] < 1e-6
    assert summary["sgs_approximate"] == (2 if bn == "branch" else 0)
    assert report["conversion"]["skipped"][0]["name"] == "6"
    markdown = (out / "report.md").read_text()
    assert "| converted" in markdown and "1x1 kernel" in markdown and "max_abs_diff_fused_vs_branched" in markdown
    branched = load_file(out / "branched.safetensors")
    fused = load_file(out / "fused.safetensors")
    assert any("branches" in k for k in branched) and not any("branches" in k for k in fused)
    assert fused["0.weight"].shape == (4, 2, 3, 3)
    plain = load_model(f"{tiny_module}:tiny_net")  # the SGS form has the original names
    masks = load_masks(out / "masks.safetensors", plain)
    assert set(masks) == {"0.weight", "3.weight"}


def test_convert_torchvision_resnet18(tmp_path, capsys):
    rc = main(["convert", "--model", "torchvision:resnet18", "--block", "repvgg", "--bn", "after",
               "--out", str(tmp_path), "--input-size", "16", "--batch", "1", "--exclude", "layer4.*", "--float64"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert summary["dtype"] == "float64" and summary["max_abs_diff_branched_vs_original"] < 1e-12
    assert summary["converted"] == 13 and summary["skipped"] == 7
    assert summary["max_rel_diff_fused_vs_branched"] < 1e-12
    assert "layer4.1.conv2" in (tmp_path / "report.md").read_text()


def test_masks_command_with_plot(tiny_module, tmp_path, capsys):
    out, png = tmp_path / "m.safetensors", tmp_path / "m.png"
    rc = main(["masks", "--model", f"{tiny_module}:tiny_net", "--block", "acb", "--bn", "after",
               "--out", str(out), "--plot", str(png)])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "exact, 2 layer(s): 0.weight, 3.weight\n      1 2 1\n      2 3 2\n      1 2 1" in printed  # grouped
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    masks = load_masks(out, load_model(f"{tiny_module}:tiny_net"))
    assert torch.equal(masks["3.weight"], torch.tensor([[1.0, 2, 1], [2, 3, 2], [1, 2, 1]]))


@pytest.mark.parametrize("spec,message", [
    ("resnet18", "not understood"),
    ("torchvision:resnet_nope", "no classification model"),
    ("reparam_no_such_module_xyz:f", "cannot import"),
    ("torch.nn:NoSuchThing", "no attribute"),
])
def test_bad_specs(spec, message, tmp_path, capsys):
    with pytest.raises(ConversionError, match=message):
        load_model(spec)
    assert main(["masks", "--model", spec, "--out", str(tmp_path / "m.safetensors")]) == 2
    assert message in capsys.readouterr().err


def test_spec_returning_non_module(tiny_module):
    with pytest.raises(ConversionError, match="not a torch.nn.Module"):
        load_model(f"{tiny_module}:not_a_model.__abs__")  # a callable that returns an int
    with pytest.raises(ConversionError, match="no nn.Conv2d"):
        load_model("torch.nn:Identity")


def test_no_conv_selected_is_an_error(tiny_module, tmp_path, capsys):
    rc = main(["masks", "--model", f"{tiny_module}:tiny_net", "--include", "nothing*",
               "--out", str(tmp_path / "m.safetensors")])
    assert rc == 2 and "no conv was converted" in capsys.readouterr().err
