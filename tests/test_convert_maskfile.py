"""Mask files: round trip, wrong model, corrupted and truncated files."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision
from torch import nn

from reparam.convert import convert_model, load_masks, read_mask_file, save_masks, to_sgs
from reparam.errors import MaskFileError, ReparamError
from reparam.sgs import attach_sgs


def _net(width: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 5, padding=2),
    )


def _sgs(width: int = 4, block: str = "repvgg"):
    torch.manual_seed(0)
    return to_sgs(convert_model(_net(width), block, "after"))


@pytest.fixture()
def saved(tmp_path):
    plain, masks, constants = _sgs()
    path = tmp_path / "masks.safetensors"
    save_masks(path, masks, model=plain, metadata={"model": "tiny", "seed": 0}, constants=constants)
    return path, plain, masks, constants


def test_round_trip(saved):
    path, plain, masks, constants = saved
    assert constants  # repvgg identity (in == out, stride 1) without BN inside: constant kernel
    loaded, loaded_constants = load_masks(path, plain, constants=True)
    assert loaded.keys() == masks.keys() and loaded_constants.keys() == constants.keys()
    for name in masks:
        assert torch.equal(loaded[name], masks[name])
    for name in constants:
        assert torch.equal(loaded_constants[name], constants[name])
    content = read_mask_file(path)
    assert content.schema == 2 and content.metadata == {"model": "tiny", "seed": 0}
    assert content.layers["3.weight"]["param_shape"] == [4, 4, 3, 3]
    assert load_masks(path, plain, constants=False).keys() == masks.keys()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, weight_decay=1e-4)
    attach_sgs(opt, loaded, constant_kernels=loaded_constants, model=plain)


def test_file_for_another_model_names_layers(saved, tmp_path):
    path, *_ = saved
    other = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(MaskFileError) as err:
        load_masks(path, other)
    message = str(err.value)
    assert "missing" in message and "0.weight" in message and "3.weight" in message and "6.weight" in message
    wider, *_ = _sgs(width=6)  # same names, other shapes
    with pytest.raises(MaskFileError, match=r"mismatched shapes: 0\.weight .*3\.weight .*6\.weight"):
        load_masks(path, wider)


def test_save_rejects_unknown_names(tmp_path):
    plain, masks, _ = _sgs()
    with pytest.raises(MaskFileError, match="no parameter named"):
        save_masks(tmp_path / "x.safetensors", {"nope.weight": torch.ones(3, 3)}, model=plain)
    with pytest.raises(MaskFileError, match="constants given"):
        save_masks(tmp_path / "x.safetensors", masks, constants={"nope.weight": torch.ones(3, 3)})


def _damaged(path, tmp_path, how: str):
    data = path.read_bytes()
    bad = tmp_path / f"{how}.safetensors"
    if how == "truncated":
        bad.write_bytes(data[: len(data) - 40])
    elif how == "header":
        bad.write_bytes(data[:8] + b"#" * 20 + data[28:])
    elif how == "length":
        bad.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    elif how == "empty":
        bad.write_bytes(b"")
    elif how == "garbage":
        bad.write_bytes(os.urandom(200))
    return bad


@pytest.mark.parametrize("how", ["truncated", "header", "length", "empty", "garbage"])
def test_corrupted_file_fails_cleanly(saved, tmp_path, how):
    path, plain, *_ = saved
    bad = _damaged(path, tmp_path, how)
    with pytest.raises(MaskFileError, match="not a readable safetensors mask file") as err:
        load_masks(bad, plain)
    assert isinstance(err.value, ReparamError) and err.value.__cause__ is None


def test_not_a_mask_file_and_bad_schema(tmp_path):
    from safetensors.torch import save_file

    plain, masks, _ = _sgs()
    plain_file = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, plain_file)
    with pytest.raises(MaskFileError, match="not a reparam mask file"):
        load_masks(plain_file, plain)
    future = tmp_path / "future.safetensors"
    save_file({"mask/0.weight": masks["0.weight"]}, future, metadata={
        "reparam.format": "sgs-masks", "reparam.schema": "99",
        "reparam.layers": json.dumps({"0.weight": {"param_shape": None, "mask_shape": [3, 3]}})})
    with pytest.raises(MaskFileError, match="schema version 99"):
        load_masks(future, plain)
    with pytest.raises(MaskFileError, match="no such mask file"):
        load_masks(tmp_path / "missing.safetensors", plain)


@pytest.mark.parametrize("header_length", [0x0180, 0x0280, 0x0580])
def test_a_safetensors_header_length_that_starts_like_a_pickle_is_not_a_pickle(tmp_path, header_length):
    """The 8-byte length of a safetensors header can begin with 0x80 0x01..0x05 (a pickle's
    protocol marker): such a file is still read as safetensors, never reported as a pickle."""
    from reparam.convert.maskfile import _foreign_format

    path = tmp_path / "masks.safetensors"
    path.write_bytes(header_length.to_bytes(8, "little") + b"{" + b" " * (header_length - 2) + b"}")
    assert path.read_bytes()[:2] == header_length.to_bytes(8, "little")[:2] and path.read_bytes()[0] == 0x80
    assert _foreign_format(str(path)) is None
    pickled = tmp_path / "masks2.safetensors"
    pickled.write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    assert "pickle" in _foreign_format(str(pickled))
