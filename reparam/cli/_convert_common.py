"""Arguments and helpers shared by ``reparam convert`` and ``reparam masks``."""
from __future__ import annotations

import argparse
from typing import Any

from torch import nn


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="SPEC",
        help="'torchvision:<name>' (random weights, no download) or 'module:callable' (called with no arguments)",
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
    import sys

    print(f"reparam {command}: error: {err}", file=sys.stderr)
    return 2
