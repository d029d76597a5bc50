"""reparam: prove, convert and measure reparameterization.

Blocks (:mod:`reparam.blocks`) -> kernel algebra (:mod:`reparam.kernels`) ->
masks and preconditioners -> the optimizer-side transform (:mod:`reparam.sgs`).
"""
from reparam.blocks import ACBlock, DBBlock, RepVGGBlock, ReparamBlock
from reparam.errors import ConfigError, NotEquivalent, NotMaskEquivalent, ReparamError
from reparam.sgs import NotEquivalentWarning, SGSHandle, SpatialPreconditioner, attach_sgs

__version__ = "0.1.0"

__all__ = [
    "ACBlock",
    "ConfigError",
    "DBBlock",
    "NotEquivalent",
    "NotEquivalentWarning",
    "NotMaskEquivalent",
    "RepVGGBlock",
    "ReparamBlock",
    "ReparamError",
    "SGSHandle",
    "SpatialPreconditioner",
    "attach_sgs",
]
