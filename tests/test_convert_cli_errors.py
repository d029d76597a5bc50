"""``reparam convert`` / ``reparam masks`` fail loudly and cleanly: one line, exit 2 (130 on
Ctrl-C), checked before the work, nothing half-written; mask files that are not mask files."""
from __future__ import annotations

import json
import pickle
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import reparam.convert.workflow as workflow
from reparam.cli import main
from reparam.convert import load_model, read_mask_file, save_masks
from reparam.errors import MaskFileError

NETS = textwrap.dedent("""
    import torch
    from torch import nn

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))

    def broken():
        raise RuntimeError("weights not found")
""")


@pytest.fixture()
def nets(model_module):
    return model_module(NETS)


def _one_line_error(capsys, command: str, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"reparam {command}: error: ") and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


@pytest.mark.parametrize("option,value", [("--batch", "0"), ("--batch", "-2"), ("--input-size", "0")])
def test_bad_probe_sizes_are_one_line_errors_before_any_work(nets, tmp_path, capsys, monkeypatch, option, value):
    monkeypatch.setattr(workflow, "load_model", lambda spec: pytest.fail("the model was built before the check"))
    out = tmp_path / "out"
    assert main(["convert", "--model", f"{nets}:tiny", "--out", str(out), option, value]) == 2
    _one_line_error(capsys, "convert", option, value, "positive")
    assert not out.exists()  # a failed convert leaves no (empty) output folder


def test_a_raising_factory_is_one_line_and_leaves_no_folder(nets, tmp_path, capsys):
    out = tmp_path / "out" / "nested"
    assert main(["convert", "--model", f"{nets}:broken", "--out", str(out)]) == 2
    _one_line_error(capsys, "convert", "RuntimeError: weights not found", "broken()")
    assert not (tmp_path / "out").exists()
    assert main(["masks", "--model", f"{nets}:broken", "--out", str(tmp_path / "m.safetensors")]) == 2
    _one_line_error(capsys, "masks", "weights not found")


def test_ctrl_c_while_writing_keeps_nothing_and_exits_130(nets, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "save_masks", interrupted)  # after branched/fused are written
    out = tmp_path / "out"
    assert main(["convert", "--model", f"{nets}:tiny", "--out", str(out), "--input-size", "6"]) == 130
    _one_line_error(capsys, "convert", "interrupted", "nothing was written")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "--model", f"{nets}:tiny", "--out", str(out), "--input-size", "6"]) == 130
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # an existing folder: only our files are removed


def test_fused_file_loads_strictly_into_the_original_architecture(nets, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", "--model", f"{nets}:tiny", "--block", "repvgg", "--bn", "after", "--out", str(out),
                 "--input-size", "6", "--float64"]) == 0
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["fused_file_layout"] == "original" and summary["max_abs_diff_fused_file_vs_branched"] < 1e-12
    original = load_model(f"{nets}:tiny").double()
    original.load_state_dict(load_file(out / "fused.safetensors"), strict=True)
    assert main(["convert", "--model", f"{nets}:tiny", "--bn", "none", "--out", str(out), "--input-size", "6"]) == 0
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["fused_file_layout"] == "fuse_model"  # BN folded away: not the original architecture


def test_masks_plot_format_is_checked_before_the_mask_file_is_written(nets, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["masks", "--model", f"{nets}:tiny", "--out", str(out), "--plot", str(tmp_path / "x.xyz")]) == 2
    _one_line_error(capsys, "masks", "'.xyz'", ".png")
    assert not out.exists()
    assert main(["masks", "--model", f"{nets}:tiny", "--out", str(out), "--plot", str(tmp_path / "grid")]) == 0
    assert (tmp_path / "grid.png").exists() and f"and {tmp_path / 'grid.png'}" in capsys.readouterr().out


def test_masks_output_groups_layers_and_fits_100_columns(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["masks", "--model", "torchvision:resnet18", "--block", "dbb", "--bn", "branch", "--out", str(out),
                 "--exclude", "layer4.*"]) == 0
    printed = capsys.readouterr().out
    assert max(len(line) for line in printed.splitlines()) <= 100
    assert "approximate, 12 layer(s): layer1.0.conv1.weight" in printed  # 12 same-mask 3x3 layers: one group
    assert printed.count("why: ") == 2


def test_a_pickle_named_safetensors_is_named_and_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled!",))

    path = tmp_path / "masks.safetensors"
    path.write_bytes(pickle.dumps({"mask/0.weight": Boom()}, protocol=2))
    with pytest.raises(MaskFileError, match="looks like a Python pickle.*not a safetensors file"):
        read_mask_file(path)
    torch.save({"x": torch.ones(1)}, path)
    with pytest.raises(MaskFileError, match="zip archive"):
        read_mask_file(path)


def test_complex_masks_and_constants_and_deep_metadata_are_mask_file_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(MaskFileError, match="complex-valued mask"):
        save_masks(path, {"w": torch.ones(3, 3, dtype=torch.complex64)})
    with pytest.raises(MaskFileError, match="complex-valued constant"):
        save_masks(path, {"w": torch.ones(3, 3)}, constants={"w": torch.ones(2, 2, 3, 3, dtype=torch.complex64)})
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(MaskFileError, match="metadata"):
        save_masks(path, {"w": torch.ones(3, 3)}, metadata={"deep": deep})
    from safetensors.torch import save_file

    from reparam.convert.maskfile import _checksum

    tensors = {"mask/w": torch.ones(3, 3, dtype=torch.complex64)}
    header = {"reparam.format": "sgs-masks", "reparam.schema": "2",
              "reparam.layers": json.dumps({"w": {"mask_shape": [3, 3]}}), "reparam.kernels": "null",
              "reparam.checksums": json.dumps({"mask/w": _checksum(tensors["mask/w"])})}
    save_file(tensors, path, metadata=header)
    with pytest.raises(MaskFileError, match="complex-valued mask"):
        read_mask_file(path)
    real = {"mask/w": torch.ones(3, 3)}
    header["reparam.checksums"] = json.dumps({"mask/w": _checksum(real["mask/w"])})
    save_file(real, path, metadata={**header, "reparam.metadata": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(MaskFileError, match="nested too deeply"):
        read_mask_file(path)


def test_heatmap_groups_identical_masks_at_85_layers(tmp_path):
    from PIL import Image

    from reparam.convert.plot import plot_masks

    acb = torch.tensor([[1.0, 2, 1], [2, 3, 2], [1, 2, 1]])
    masks = {f"stage{i // 10}.block{i % 10}.conv.weight": acb for i in range(84)}
    masks["stem.weight"] = torch.ones(7, 7) + torch.eye(7)
    groups = plot_masks(masks, tmp_path / "grid.png", title="85 layers")
    assert [len(g.weights) for g in groups] == [84, 1]
    width, height = Image.open(tmp_path / "grid.png").size
    assert height < 800 and width < 1400  # two panels and a legend, not 85 panels


def test_masks_ctrl_c_after_the_plot_leaves_nothing(nets, tmp_path, capsys, monkeypatch):
    import reparam.convert as convert

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "save_masks", interrupted)
    out, png = tmp_path / "m.safetensors", tmp_path / "m.png"
    assert main(["masks", "--model", f"{nets}:tiny", "--out", str(out), "--plot", str(png)]) == 130
    _one_line_error(capsys, "masks", "interrupted")
    assert not png.exists() and not out.exists()
