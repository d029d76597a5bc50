"""Clear errors at construction: every bad argument raises a ConfigError (a ValueError) whose
message names the argument and the block."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam
from reparam import ACBlock, ConfigError, DBBlock, RepVGGBlock
from reparam.kernels import fold_batchnorm

CLASSES = [ACBlock, RepVGGBlock, DBBlock]

BAD = [
    # (args, kwargs, words that must appear in the message)
    ((4, 4, 2), {}, ["kernel_size", "(2, 2)"]),
    ((4, 4, (3, 4)), {}, ["kernel_size", "even"]),
    ((4, 4, 0), {}, ["kernel_size"]),
    ((4, 4, (3, 3, 3)), {}, ["kernel_size"]),
    ((4, 4, 3.0), {}, ["kernel_size"]),
    ((4, 6, 3), {"groups": 4}, ["groups=4", "in_channels=4", "out_channels=6"]),
    ((6, 4, 3), {"groups": 4}, ["groups=4"]),
    ((4, 4, 3), {"groups": 0}, ["groups"]),
    ((4, 4, 3), {"bn": "batch"}, ["bn='batch'", "branch", "after", "none"]),
    ((4, 4, 3), {"bn": None}, ["bn=None"]),
    ((4, 4, 3), {"padding_mode": "reflect"}, ["padding_mode='reflect'"]),
    ((4, 4, 3), {"padding_mode": "circular"}, ["padding_mode='circular'"]),
    ((4, 4, 3), {"bn": "branch", "mode": "merged"}, ["mode='merged'", "bn"]),
    ((4, 4, 3), {"mode": "fused"}, ["mode='fused'"]),
    ((4, 4, 3), {"padding": -1}, ["padding", "-1"]),
    ((4, 4, 3), {"padding": (1, -2)}, ["padding", "-2"]),
    ((4, 4, 3), {"padding": "valid"}, ["padding", "valid"]),
    ((4.0, 4, 3), {}, ["in_channels", "4.0"]),
    ((4, "4", 3), {}, ["out_channels", "'4'"]),
    ((0, 4, 3), {}, ["in_channels", "0"]),
    ((4, -2, 3), {}, ["out_channels", "-2"]),
    ((4, 4, 3), {"stride": 0}, ["stride"]),
    ((4, 4, 3), {"dilation": (1, 0)}, ["dilation"]),
    ((4, 4, 3), {"stride": "2"}, ["stride"]),
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("args, kwargs, words", BAD, ids=[f"{a}-{k}" for a, k, _ in BAD])
def test_bad_construction_names_the_argument(cls, args, kwargs, words):
    with pytest.raises(ConfigError) as info:
        cls(*args, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, reparam.ReparamError)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_block_name_in_message(cls):
    with pytest.raises(ConfigError, match=cls.__name__):
        cls(4, 4, 2)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_switching_to_merged_mode_with_branch_bn(cls):
    block = cls(4, 4, 3, bn="branch")
    with pytest.raises(ConfigError, match="mode='merged'"):
        block.mode = "merged"
    assert block.mode == "branched"  # unchanged after the failed assignment
    with pytest.raises(ConfigError, match="mode='both'"):
        cls(4, 4, 3, bn="none").mode = "both"


@pytest.mark.parametrize("branches", [("kxk", "3x3"), (), ("avg",)])
def test_dbb_bad_branches(branches):
    with pytest.raises(ConfigError, match="branches"):
        DBBlock(4, 4, 3, branches=branches)


def test_valid_edge_cases_construct():
    """The boundaries of the checks are accepted (guards against over-strict validation)."""
    ACBlock(1, 1, 1)
    RepVGGBlock(4, 4, (1, 7), padding=0)
    DBBlock(6, 6, 5, groups=6, padding="same", stride=(2, 1), dilation=2)
    ACBlock(4, 8, 3, groups=4, padding=(0, 3))


def test_fold_batchnorm_without_running_stats():
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ConfigError, match="track_running_stats"):
        fold_batchnorm(torch.ones(4, 2, 3, 3), None, bn)
