"""The gradient form of reparameterization: masks, preconditioners, and the optimizer-side transform."""
from reparam.sgs.attach import NotEquivalentWarning, SGSHandle, attach_sgs
from reparam.sgs.dynamic import PUBLISHED_SCHEDULES, DynamicSGS
from reparam.sgs.preconditioner import SpatialPreconditioner, jacobian_preconditioner_apply
from reparam.sgs.theory import exact_mode, inexact_reasons

__all__ = [
    "PUBLISHED_SCHEDULES",
    "DynamicSGS",
    "NotEquivalentWarning",
    "SGSHandle",
    "SpatialPreconditioner",
    "attach_sgs",
    "exact_mode",
    "inexact_reasons",
    "jacobian_preconditioner_apply",
]
