"""The gradient form of reparameterization: masks, preconditioners, and the optimizer-side transform."""
from reparam.errors import NotEquivalentWarning
from reparam.sgs.attach import SGSHandle, attach_sgs
from reparam.sgs.preconditioner import SpatialPreconditioner
from reparam.sgs.theory import exact_mode, inexact_reasons

__all__ = [
    "NotEquivalentWarning",
    "SGSHandle",
    "SpatialPreconditioner",
    "attach_sgs",
    "exact_mode",
    "inexact_reasons",
]
