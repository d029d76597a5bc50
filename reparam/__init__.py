"""reparam: prove, convert and measure reparameterization.

Blocks (:mod:`reparam.blocks`) -> kernel algebra (:mod:`reparam.kernels`) ->
masks and preconditioners -> the optimizer-side transform (:mod:`reparam.sgs`).
"""
from reparam.blocks import ACBlock, DBBlock, ReparamBlock, RepVGGBlock
from reparam.errors import ConfigError, NotEquivalent, NotMaskEquivalent, PGTAssumptionError, ReparamError
from reparam.pgt import (
    PowerGradCrossEntropy,
    PowerGradLogits,
    adaptive_grad_clip_,
    power_grad_cross_entropy,
    power_grad_logits,
)
from reparam.sgs import DynamicSGS, NotEquivalentWarning, SGSHandle, SpatialPreconditioner, attach_sgs

__version__ = "0.1.0"

__all__ = [
    "ACBlock",
    "ConfigError",
    "DBBlock",
    "DynamicSGS",
    "NotEquivalent",
    "NotEquivalentWarning",
    "NotMaskEquivalent",
    "PGTAssumptionError",
    "PowerGradCrossEntropy",
    "PowerGradLogits",
    "RepVGGBlock",
    "ReparamBlock",
    "ReparamError",
    "SGSHandle",
    "SpatialPreconditioner",
    "adaptive_grad_clip_",
    "attach_sgs",
    "power_grad_cross_entropy",
    "power_grad_logits",
]
