"""Clear errors at construction: every bad argument raises a ConfigError (a ValueError) whose
message names the argument and the block."""
from __future__ import annotations

import numpy as np
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
    ((4, 4, 3), {"padding": "full"}, ["padding='full'", "same", "valid"]),
    ((4, 4, 3), {"padding": "same", "stride": 2}, ["padding='same'", "stride=(2, 2)", "explicit padding"]),
    ((4, 4, 3), {"padding": "same", "stride": (1, 2)}, ["padding='same'", "stride=(1, 2)"]),
    ((4, 4, True), {}, ["kernel_size", "True"]),
    ((4, 4, (3, False)), {}, ["kernel_size", "False"]),
    ((4, 4, 3), {"stride": True}, ["stride", "True"]),
    ((4, 4, 3), {"padding": True}, ["padding", "True"]),
    ((4, 4, 3), {"dilation": 1.0}, ["dilation", "1.0"]),
    ((4, 4, 3), {"groups": True}, ["groups", "True"]),
    ((True, 4, 3), {}, ["in_channels", "True"]),
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
@pytest.mark.parametrize("kwargs", [{"kernel_size": 2}, {"kernel_size": "3"}, {"stride": 1.5}, {"padding": (1, 1, 1)},
                                    {"dilation": [1, "2"]}], ids=repr)
def test_block_name_in_message(cls, kwargs):
    """Every message names the block, including those of the int / pair checks."""
    with pytest.raises(ConfigError, match=cls.__name__):
        cls(4, 4, **{"kernel_size": 3, **kwargs})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_integer_like_arguments_are_accepted_like_conv2d(cls):
    """``numpy`` integers (anything with ``__index__``) are ints, as for ``nn.Conv2d``."""
    i = np.int64
    block = cls(i(4), i(4), i(3), stride=(i(1), 1), padding=i(1), dilation=i(1), groups=i(2))
    conv = nn.Conv2d(i(4), i(4), i(3), stride=(i(1), 1), padding=i(1), dilation=i(1), groups=i(2))
    assert (block.in_channels, block.kernel_size, block.stride, block.padding, block.groups) == (
        conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.groups
    )
    assert all(type(v) is int for v in (block.in_channels, block.groups, *block.kernel_size, *block.padding))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kernel, dilation", [(3, 1), ((5, 3), (2, 1)), (1, 1)])
def test_padding_valid_is_zero_and_exact(cls, kernel, dilation):
    """``"valid"`` is padding 0: the same output shape as ``nn.Conv2d(padding="valid")`` and an
    exact fusion (the smaller branches crop the input to stay aligned)."""
    torch.manual_seed(0)
    block = cls(4, 4, kernel, padding="valid", dilation=dilation, bn="none").double().eval()
    assert block.padding == (0, 0)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    reference = nn.Conv2d(4, 4, kernel, padding="valid", dilation=dilation).double()
    with torch.no_grad():
        out = block(x)
        assert out.shape == reference(x).shape
        torch.testing.assert_close(block.fuse()(x), out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bn", ["branch", "after", "none"])
def test_factory_kwargs_create_parameters_and_buffers_there(cls, bn):
    """``device=`` / ``dtype=`` as in ``nn.Conv2d``: every parameter and floating buffer is
    created with them (the meta device proves nothing was made elsewhere and moved)."""
    block = cls(4, 4, 3, bn=bn, dtype=torch.float64)
    tensors = [*block.parameters(), *(b for b in block.buffers() if b.is_floating_point())]
    assert tensors and all(t.dtype == torch.float64 for t in tensors)
    meta = cls(4, 4, 3, bn=bn, device="meta", dtype=torch.float16)
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert all(t.dtype == torch.float16 for t in [*meta.parameters(), *meta.buffers()] if t.is_floating_point())
    # the default keeps the default dtype for parameters and constant kernels alike
    assert {t.dtype for t in [*cls(4, 4, 3, bn=bn).parameters(), *cls(4, 4, 3, bn=bn).buffers()]
            if t.is_floating_point()} == {torch.get_default_dtype()}


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
    DBBlock(6, 6, 5, groups=6, padding=None, stride=(2, 1), dilation=2)
    DBBlock(6, 6, 5, groups=6, padding="same", dilation=2)
    RepVGGBlock(4, 4, 3, padding="valid", stride=2)
    ACBlock(4, 8, 3, groups=4, padding=(0, 3))


def test_fold_batchnorm_without_running_stats():
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ConfigError, match="track_running_stats"):
        fold_batchnorm(torch.ones(4, 2, 3, 3), None, bn)
