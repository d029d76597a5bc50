"""The model arguments shared by ``reparam convert`` and ``reparam masks``."""
from __future__ import annotations

import argparse

from reparam.blocks import BLOCKS, BN_PLACEMENTS
from reparam.cli._common import MODEL_SPEC_HELP


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="SPEC",
        help=MODEL_SPEC_HELP,
    )
    parser.add_argument("--block", choices=sorted(BLOCKS), default="acb", help="block type (default: acb)")
    parser.add_argument(
        "--bn", choices=BN_PLACEMENTS, default="branch",
        help="BatchNorm placement in the blocks (default: branch)",
    )
    parser.add_argument("--include", action="append", default=None, metavar="PAT",
                        help="convert only convs whose qualified name matches this fnmatch pattern (repeatable)")
    parser.add_argument("--exclude", action="append", default=None, metavar="PAT",
                        help="leave convs whose qualified name matches this fnmatch pattern (repeatable)")
