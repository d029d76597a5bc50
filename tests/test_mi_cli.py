"""``reparam mi``, the natural-image sources behind it, and its figures."""
from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

from reparam.cli import main
from reparam.convert import load_masks, load_model
from reparam.convert.maskfile import read_mask_file
from reparam.errors import ConfigError
from reparam.images import NaturalCrops, _shipped_photographs, folder_images, image_batches, natural_photographs, random_crop
from reparam.sgs.plots import depth_subset, g_table, plot_g_depth, plot_g_grid

TINY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def rgb_net():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        )

    def grey_net():
        return nn.Sequential(nn.Conv2d(1, 4, 3))

    def pointwise_net():
        return nn.Sequential(nn.Conv2d(3, 4, 1))
    """
)
SMALL = ["--batches", "2", "--batch-size", "6", "--image-size", "12"]


@pytest.fixture()
def nets(model_module):
    return model_module(TINY)


@pytest.fixture()
def image_dir(tmp_path):
    from PIL import Image

    gen = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(2):
            array = gen.integers(0, 256, size=(20 + 5 * i, 24, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / "imgs" / label / f"{i}.png")
    return tmp_path / "imgs"


def test_mi_natural_writes_masks_metadata_and_figures(nets, tmp_path, capsys):
    out, plot = tmp_path / "m.safetensors", tmp_path / "G.png"
    rc = main(["mi", "--model", f"{nets}:rgb_net", "--images", "natural", *SMALL, "--k", "4",
               "--out", str(out), "--plot", str(plot)])
    assert rc == 0, capsys.readouterr().err
    model = load_model(f"{nets}:rgb_net")
    masks = load_masks(out, model)
    assert set(masks) == {"0.weight", "3.weight"}  # the 1x1 conv has no spatial taps
    meta = read_mask_file(out).metadata
    assert meta["k"] == 4.0 and meta["batches"] == 2 and meta["batch_size"] == 6 and meta["images"] == "natural"
    from reparam.sgs.streaming import masks_from_data

    expected = masks_from_data(model, image_batches("natural", 2, 6, 12), k=4.0)
    assert all(torch.allclose(masks[n], expected[n].to(masks[n].dtype)) for n in expected)
    assert plot.stat().st_size > 5000 and (tmp_path / "G_depth.png").stat().st_size > 5000
    assert "wrote" in capsys.readouterr().out


def test_mi_image_folder(nets, image_dir, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc = main(["mi", "--model", f"{nets}:rgb_net", "--images", str(image_dir), *SMALL, "--crop-scale", "0.5", "1",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert len(folder_images(image_dir)) == 4
    assert set(load_masks(out, load_model(f"{nets}:rgb_net"))) == {"0.weight", "3.weight"}


@pytest.mark.parametrize("args, message", [
    (["--batches", "0"], "--batches 0: must be >= 1"),
    (["--k", "0.5"], "--k 0.5"),
    (["--crop-scale", "0", "2"], "--crop-scale"),
    (["--images", "/no/such/dir"], "not a directory"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nodevice"], "--device"),
    (["--out", "/no/such/dir/m.safetensors"], "not an existing directory"),
    (["--model", "nomodule_xyz_reparam:f"], "cannot import"),
    (["--model", "{nets}:grey_net"], "takes 1 channels; the images are RGB"),
    (["--model", "{nets}:pointwise_net"], "no conv with a kernel larger than 1"),
])
def test_bad_input_is_one_line_exit_2(args, message, nets, tmp_path, capsys):
    # a repeated option takes its last value: args override the defaults
    rc = main(["mi", "--model", f"{nets}:rgb_net", "--out", str(tmp_path / "m.safetensors"),
               *[a.format(nets=nets) for a in args]])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("reparam mi: error:") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "m.safetensors").exists()


def test_empty_folder_is_named(nets, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["mi", "--model", f"{nets}:rgb_net", "--images", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "m.safetensors")]) == 2
    assert "no image files" in capsys.readouterr().err


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="bad.png: cannot read"):
        image_batches(tmp_path, 1, 2, 8)


def test_missing_image_packages_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    _shipped_photographs.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"pip install 'reparam\[images\]'"):
            natural_photographs()
    finally:
        _shipped_photographs.cache_clear()


def test_natural_crops_are_real_deterministic_and_sized():
    photos = natural_photographs()
    assert len(photos) >= 5 and all(p.shape[0] == 3 and p.min() >= 0 and p.max() <= 1 for _, p in photos)
    data = NaturalCrops(8, 10, seed=3)
    x, label = data[5]
    assert x.shape == (3, 10, 10) and 0 <= label < len(photos) and torch.equal(x, data[5][0])
    assert not torch.equal(x, NaturalCrops(8, 10, seed=4)[5][0])
    gen = torch.Generator().manual_seed(0)
    tiny = torch.rand(3, 5, 7)
    assert random_crop(tiny, 9, gen).shape == (3, 9, 9)  # upsampled when smaller than the crop
    assert random_crop(photos[0][1], 16, gen, scale=(0.5, 1.0)).shape == (3, 16, 16)


def test_g_table_and_depth_subset():
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    row = g_table({"a.weight": g}).iloc[0]
    assert (row.centre, row.edge, row.corner, row["min"], row["max"]) == (5.0, 5.0, 5.0, 1.0, 9.0)
    row = g_table({"b.weight": torch.arange(15.0).reshape(3, 5)}).iloc[0]  # non-square: centre (1, 2)
    assert (row.centre, row.kernel, row.corner) == (7.0, "3x5", 7.0)
    shown = depth_subset(60, 24)
    assert len(shown) == 24 and shown[0] == 0 and shown[-1] == 59
    assert depth_subset(5, 24) == [0, 1, 2, 3, 4]


def test_figures_for_many_layers(tmp_path):
    masks = {f"layer{i}.weight": torch.rand(3, 3) + i / 30 for i in range(55)}
    shown = plot_g_grid(masks, tmp_path / "grid.png", title="55 layers", max_layers=6)
    plot_g_depth(masks, tmp_path / "depth.png")
    assert shown == [0, 11, 22, 32, 43, 54] and (tmp_path / "grid.png").stat().st_size > 5000
    assert (tmp_path / "depth.png").stat().st_size > 5000
