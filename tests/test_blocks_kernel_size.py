"""Kernel sizes at the edge: non-positive sizes are named as such, and a kernel side of 1
builds no branch that copies another (a copy only multiplies the learning rate of its taps)."""
from __future__ import annotations

import pytest
import torch

from reparam import ACBlock, DBBlock, RepVGGBlock
from reparam.errors import ConfigError

CLASSES = [ACBlock, RepVGGBlock, DBBlock]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kernel", [-3, 0, (3, -1), (0, 3)])
def test_non_positive_kernel_size_says_positive(cls, kernel):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}: kernel_size must be positive") as info:
        cls(8, 8, kernel)
    assert "even" not in str(info.value)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_even_kernel_still_says_even(cls):
    with pytest.raises(ConfigError, match="even side"):
        cls(8, 8, (3, 4))


@pytest.mark.parametrize(
    "cls, kernel, branches, mask",
    [
        (ACBlock, 1, ["square"], [[1.0]]),
        (ACBlock, (1, 3), ["square", "vertical"], [[1.0, 2.0, 1.0]]),
        (ACBlock, (3, 1), ["square", "horizontal"], [[1.0], [2.0], [1.0]]),
        (ACBlock, 3, ["square", "horizontal", "vertical"], [[1.0, 2.0, 1.0], [2.0, 3.0, 2.0], [1.0, 2.0, 1.0]]),
        (RepVGGBlock, 1, ["kxk", "identity"], [[1.0]]),
        (RepVGGBlock, (1, 3), ["kxk", "1x1", "identity"], [[1.0, 2.0, 1.0]]),
    ],
)
def test_side_one_builds_no_copies(cls, kernel, branches, mask):
    block = cls(4, 4, kernel, bn="none")
    assert list(block.branches) == branches
    assert torch.equal(block.sgs_mask(), torch.tensor(mask))


def test_dbb_1x1_builds_the_branches_selected():
    """DBB's ``branches`` is an explicit choice: kept as given, also where two are the same 1x1 conv."""
    assert list(DBBlock(4, 4, 1, bn="none", branches=("kxk", "1x1_kxk")).branches) == ["kxk", "1x1_kxk"]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kernel", [1, (1, 3), (3, 1)])
def test_pruned_blocks_still_fuse_exactly(cls, kernel):
    torch.manual_seed(0)
    block = cls(4, 4, kernel, bn="branch").double()
    block.train()
    block(torch.randn(4, 4, 7, 7, dtype=torch.float64))  # move the BN statistics off their defaults
    block.eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(block.fuse()(x), out, rtol=0, atol=1e-12)
        assert out.abs().max() > 0.1
