"""The gradient form of reparameterization: masks, preconditioners, and the optimizer-side transform."""
from reparam.sgs.attach import NotEquivalentWarning, SGSHandle, attach_sgs
from reparam.sgs.dependence import DependenceWarning, scaling_from_dependence, spatial_dependence
from reparam.sgs.preconditioner import SpatialPreconditioner, jacobian_preconditioner_apply
from reparam.sgs.streaming import masks_from_data
from reparam.sgs.theory import exact_mode, inexact_reasons

__all__ = [
    "DependenceWarning",
    "NotEquivalentWarning",
    "SGSHandle",
    "SpatialPreconditioner",
    "attach_sgs",
    "exact_mode",
    "inexact_reasons",
    "jacobian_preconditioner_apply",
    "masks_from_data",
    "scaling_from_dependence",
    "spatial_dependence",
]
