"""Arguments and helpers shared by ``reparam convert`` and ``reparam masks``."""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="SPEC",
        help="'torchvision:<name>' (random weights, no download) or 'module:callable' (called with no arguments; "
             "the module may live in the current directory)",
    )
    parser.add_argument("--block", choices=("acb", "repvgg", "dbb"), default="acb", help="block type (default: acb)")
    parser.add_argument(
        "--bn", choices=("branch", "after", "none"), default="branch",
        help="BatchNorm placement in the blocks (default: branch)",
    )
    parser.add_argument("--include", action="append", default=None, metavar="PAT",
                        help="convert only convs whose qualified name matches this fnmatch pattern (repeatable)")
    parser.add_argument("--exclude", action="append", default=None, metavar="PAT",
                        help="leave convs whose qualified name matches this fnmatch pattern (repeatable)")


def first_conv_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def fail(command: str, err: Any) -> int:
    print(f"reparam {command}: error: {err}", file=sys.stderr)
    return 2


def prepare_output(path: str, directory: bool = False) -> str | None:
    """Create the output directory (``directory=True``) or check that the output file's
    directory exists; return why ``path`` cannot be written (one line), or None."""
    target = os.path.abspath(path)
    folder = target if directory else os.path.dirname(target)
    if directory:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            return f"cannot create output directory {path}: {err.strerror or err}"
    elif os.path.isdir(target):
        return f"cannot write {path}: it is a directory"
    if not os.path.isdir(folder):
        return f"cannot write {path}: {folder} is not an existing directory"
    if not os.access(folder, os.W_OK):
        return f"cannot write {path}: directory {folder} is not writable"
    return None


@contextmanager
def printed_warnings(command: str) -> Iterator[None]:
    """Print the warnings raised inside as one ``reparam <command>: warning: ...`` line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                print(f"reparam {command}: warning: {warning.message}", file=sys.stderr)


@torch.no_grad()
def randomized_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics and affine parameters and conv
    biases are random (deterministic in ``seed``), so that a function-preservation check
    cannot pass by accident (torchvision's fresh BatchNorms are the identity in eval mode)."""
    copied = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for module in copied.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            if module.running_mean is not None:
                module.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            if module.affine:
                module.weight.copy_(1 + 0.3 * torch.randn(n, generator=gen))
                module.bias.copy_(0.2 * torch.randn(n, generator=gen))
        elif isinstance(module, nn.Conv2d) and module.bias is not None:
            module.bias.copy_(0.1 * torch.randn(module.out_channels, generator=gen))
    return copied
