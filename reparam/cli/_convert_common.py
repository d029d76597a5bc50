"""Arguments and helpers shared by ``reparam convert`` and ``reparam masks``."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from reparam.blocks import BLOCKS, BN_PLACEMENTS

#: exit status of a usage error, and of a run stopped by Ctrl-C (128 + SIGINT, as shells report it)
USAGE_ERROR, INTERRUPTED = 2, 130


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="SPEC",
        help="'torchvision:<name>' or 'timm:<name>[?key=value&...]' (random weights, no download) or "
             "'module:callable' (called with no arguments; the module may live in the current directory)",
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


def fail(command: str, err: Any, status: int = USAGE_ERROR) -> int:
    """Print ``reparam <command>: error: <err>`` (one line) to stderr; return ``status``."""
    text = str(err).strip()
    print(f"reparam {command}: error: {text.splitlines()[0] if text else type(err).__name__}", file=sys.stderr)
    return status


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def output_folder_problem(path: str) -> str | None:
    """Why the output folder ``path`` cannot be created or written (one line), or None. Creates
    nothing: the folder is made only when the outputs are written."""
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        return f"cannot write to {path}: it is a file, not a folder"
    existing = _nearest_existing(target)
    if not os.path.isdir(existing):
        return f"cannot create output directory {path}: {existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create output directory {path}: {existing} is not writable"
    return None


def prepare_output(path: str) -> str | None:
    """Check that the output file's directory exists and is writable; return why ``path``
    cannot be written (one line), or None."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
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
