"""Helpers shared by the sub-commands: one-line usage errors, output checks made before any
work, and Ctrl-C / SIGTERM handling that keeps what finished."""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reparam.errors import sigterm_as_interrupt  # noqa: F401 (the commands' one import for it)

#: what ``--model`` accepts, for every command that loads a model
MODEL_SPEC_HELP = ("'torchvision:<name>' or 'timm:<name>[?key=value&...]' (random weights, no download) or "
                   "'module:callable' (called with no arguments; the module may live in the current directory)")
#: the exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it
INTERRUPTED = 130
#: the exit status of a usage error (bad argument, unusable output or device)
USAGE_ERROR = 2


def fail(command: str, problem: object, status: int = USAGE_ERROR) -> int:
    """Print ``reparam <command>: error: <problem>`` (its first line) to stderr; return ``status``."""
    text = str(problem).strip()
    print(f"reparam {command}: error: {text.splitlines()[0] if text else type(problem).__name__}", file=sys.stderr)
    return status


def output_dir_problem(path: Path, option: str = "--out") -> str | None:
    """Why the folder ``path`` cannot receive reports (None if it can), decided before any work
    by creating it (with its parents) and a probe file in it: an existing file, a read-only or
    permission-denied location. The folder is left in place (empty) when it can be written."""
    if path.exists() and not path.is_dir():
        return f"{option} {path} is a file, not a folder; give a folder for the reports"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return f"{option} {path} is not a writable folder ({err.strerror or err}); choose another folder"
    return None


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
