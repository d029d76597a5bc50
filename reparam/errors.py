"""Exceptions raised by reparam. All are ``ValueError`` subclasses so that callers
that validate input generically keep working."""
from __future__ import annotations


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


class NotEquivalentWarning(UserWarning):
    """SGS is applied in a way that does not reproduce branched training exactly (``strict=False``)."""
