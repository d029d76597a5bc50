"""Helpers shared by the sub-commands: one-line usage errors, output checks made before any
work, and Ctrl-C / SIGTERM handling that keeps what finished."""
from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

#: the exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it
INTERRUPTED = 130
#: the exit status of a usage error (bad argument, unusable output or device)
USAGE_ERROR = 2


def fail(command: str, problem: object) -> int:
    """Print ``reparam <command>: error: <problem>`` (one line) to stderr; return :data:`USAGE_ERROR`."""
    print(f"reparam {command}: error: {problem}", file=sys.stderr)
    return USAGE_ERROR


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


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (``timeout``, a job scheduler) like Ctrl-C for the duration, so that the
    caller's ``except KeyboardInterrupt`` keeps what finished. The previous handler is restored;
    outside the main thread (where signals cannot be handled) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
