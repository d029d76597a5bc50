"""The one table of optimizer cases of the verification suite: name -> factory -> theory class.

The theory class (:data:`reparam.sgs.theory.SGD_FAMILY` or ``ELEMENTWISE_ADAPTIVE``) is what the
verdicts reason about; the suite runs every case, the strategies draw from the same classes."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from reparam.sgs.theory import ELEMENTWISE_ADAPTIVE, SGD_FAMILY, auto_mode

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], object]

#: names of the theory classes (families) an optimizer case can belong to
LINEAR, ELEMENTWISE = "linear", "elementwise"
#: the element-wise adaptive optimizers of the theory, by class name (``update`` mode exact
#: without coupled weight decay)
ADAPTIVE_OPTIMIZERS: tuple[str, ...] = tuple(cls.__name__ for cls in ELEMENTWISE_ADAPTIVE)


@dataclass(frozen=True)
class OptimizerCase:
    """A named optimizer configuration (and an optional LR schedule)."""

    name: str
    factory: OptimizerFactory
    scheduler: SchedulerFactory | None = None

    def _probe(self) -> torch.optim.Optimizer:
        return self.factory([torch.nn.Parameter(torch.zeros(1))])

    @property
    def cls(self) -> type:
        """The optimizer class the factory builds."""
        return type(self._probe())

    @property
    def theory_class(self) -> str:
        """:data:`LINEAR` (``reparam.sgs.theory.SGD_FAMILY``) or :data:`ELEMENTWISE`
        (``ELEMENTWISE_ADAPTIVE``), by exact type as the theory classifies it."""
        cls = self.cls
        if cls in SGD_FAMILY:
            return LINEAR
        if cls in ELEMENTWISE_ADAPTIVE:
            return ELEMENTWISE
        raise ValueError(f"optimizer case {self.name!r}: {cls.__name__} is in no theory class of reparam.sgs.theory")

    @property
    def auto_mode(self) -> str:
        """The SGS mode ``attach_sgs(mode="auto", strict=False)`` applies (see
        :func:`reparam.sgs.theory.auto_mode`)."""
        optimizer = self._probe()
        return auto_mode(optimizer, optimizer.param_groups)

    @property
    def wrong_mode(self) -> str:
        """The deliberately wrong SGS mode: the one "auto" does not apply, so each case pair runs
        both (for Adam with coupled decay, auto falls back to ``grad`` and the control is ``update``)."""
        return "update" if self.auto_mode == "grad" else "grad"


def _exp_schedule(gamma: float) -> SchedulerFactory:
    return lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma)


def _cosine(t_max: int) -> SchedulerFactory:
    return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, t_max)


O = torch.optim
#: RAdam's lr is 5x Adam's: its first rectified step is step 6 (``radam_first_rectified_step``),
#: so a short run (``--quick``: 3 rectified steps) must still lift its grad-mode negative control
#: clearly above float32's divergence floor (at lr 1e-2 it measured 6e-4 / 9e-4, inside the
#: inconclusive band).
OPTIMIZERS: tuple[OptimizerCase, ...] = (
    OptimizerCase("sgd", lambda p: O.SGD(p, lr=0.1)),
    OptimizerCase("sgd-momentum", lambda p: O.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-3), _exp_schedule(0.9)),
    OptimizerCase("sgd-nesterov-wd", lambda p: O.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    OptimizerCase("sgd-dampening", lambda p: O.SGD(p, lr=0.05, momentum=0.8, dampening=0.3), _cosine(10)),
    OptimizerCase("adam", lambda p: O.Adam(p, lr=1e-2, betas=(0.8, 0.95))),
    OptimizerCase("adamw", lambda p: O.AdamW(p, lr=1e-2, weight_decay=0.1), _cosine(10)),
    OptimizerCase("adamax", lambda p: O.Adamax(p, lr=1e-2)),
    OptimizerCase("nadam", lambda p: O.NAdam(p, lr=1e-2)),
    OptimizerCase("radam", lambda p: O.RAdam(p, lr=5e-2)),
    OptimizerCase("adagrad", lambda p: O.Adagrad(p, lr=5e-2, lr_decay=1e-3)),
    OptimizerCase("rmsprop-centered-momentum", lambda p: O.RMSprop(p, lr=1e-3, momentum=0.5, centered=True)),
    OptimizerCase("adadelta", lambda p: O.Adadelta(p, lr=1.0)),
    OptimizerCase("adam-coupled-wd", lambda p: O.Adam(p, lr=1e-2, weight_decay=0.1)),
)
OPTIMIZER_NAMES = tuple(o.name for o in OPTIMIZERS)
BY_NAME = {o.name: o for o in OPTIMIZERS}
