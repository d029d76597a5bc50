"""Exceptions and warnings raised by reparam. Every error is a ``ValueError`` subclass so that
callers that validate input generically keep working; every warning is a :class:`ReparamWarning`.
Also the two helpers every front end uses to report them: :func:`error_line` (one line per error)
and :func:`sigterm_as_interrupt` (SIGTERM handled like Ctrl-C, so finished work is kept)."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class ReparamError(ValueError):
    """Base class of every error reparam raises on bad input."""


class ConfigError(ReparamError):
    """A block, layer or argument configuration that reparam does not support."""


class NotMaskEquivalent(ReparamError):
    """A block has a branch that is not a binary receptive-field mask of the fused
    kernel, so no spatial gradient scaling ``G = sum_n M_n`` reproduces it exactly."""


class NotEquivalent(ReparamError):
    """No exact SGS application exists for this optimizer / configuration."""


class PGTAssumptionError(ReparamError):
    """The PowerGrad logits transform cannot rebuild the transformed gradient because
    the incoming gradient does not have the softmax cross-entropy form it assumes
    (or the per-row scale of that form cannot be recovered)."""


class ConversionError(ReparamError):
    """A model cannot be converted, fused or turned into its SGS form as asked, or a model
    spec (``torchvision:<name>`` / ``module:callable``) cannot be resolved."""


class MaskFileError(ReparamError):
    """A mask file is unreadable (corrupted, truncated, not a reparam mask file, unknown
    schema) or does not fit the model it is loaded into (missing layers, wrong shapes)."""


class ReparamWarning(UserWarning):
    """Base class of every warning reparam raises: filter them all with
    ``warnings.simplefilter("ignore", ReparamWarning)``."""


class NotEquivalentWarning(ReparamWarning):
    """SGS is applied in a way that does not reproduce branched training exactly (``strict=False``)."""


class UntraceableModelWarning(ReparamWarning):
    """``convert_model`` could not trace the model with torch.fx and fell back to converting
    without absorbing any BatchNorm; the message says why and what the fallback did."""


class BatchNormNotAbsorbedWarning(ReparamWarning):
    """``convert_model`` was asked for ``bn="branch"``/``"after"`` but some convs have no
    BatchNorm it can absorb; they became ``bn="none"`` blocks. The message names them and why."""


class MaskFileWarning(ReparamWarning):
    """A mask file was applied only partly (``allow_missing=True``), or part of it (its
    constant kernels) was not returned."""


class DependenceWarning(ReparamWarning):
    """A layer's dependence could not be measured (dead layer, NaN/inf in its input, no pairs left):
    its ``G`` is all ones (plain training for that layer), and the warning names it."""


class NothingToConvertWarning(ReparamWarning):
    """The model has no conv to convert and no branched block to fuse or turn into SGS masks."""


def error_line(err: BaseException) -> str:
    """``Type: message`` of ``err``: its first line, at most 300 characters."""
    return f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]


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
