"""The gradient form of reparameterization: masks, preconditioners, and the optimizer-side transform."""
from reparam.errors import DependenceWarning, NotEquivalentWarning
from reparam.sgs.attach import SGSHandle, attach_sgs
from reparam.sgs.dependence import scaling_from_dependence, spatial_dependence
from reparam.sgs.dynamic import PUBLISHED_SCHEDULES, DynamicSGS
from reparam.sgs.preconditioner import SpatialPreconditioner
from reparam.sgs.streaming import masks_from_data
from reparam.sgs.theory import exact_mode, inexact_reasons

__all__ = [
    "PUBLISHED_SCHEDULES",
    "DependenceWarning",
    "DynamicSGS",
    "NotEquivalentWarning",
    "SGSHandle",
    "SpatialPreconditioner",
    "attach_sgs",
    "exact_mode",
    "inexact_reasons",
    "masks_from_data",
    "scaling_from_dependence",
    "spatial_dependence",
]
