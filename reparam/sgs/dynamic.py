"""``DynamicSGS``: train with spatial gradient scaling whose ``G`` is refreshed from the data.

The SGS paper's own method: ``G`` of every qualifying conv is computed from the dependence
(mutual information) between neighbouring pixels of the conv's input
(:func:`reparam.sgs.streaming.masks_from_data`), held at 1 during a warm-up, refreshed
during training, and applied by an :class:`~reparam.sgs.attach.SGSHandle` whose masks are
replaced in place. See docs/mi_training.md for the method, its defaults and what differs
from the paper and from the official code.
"""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from reparam.errors import ConfigError
from reparam.sgs.attach import SGSHandle, attach_sgs
from reparam.sgs.dependence import MEASURES

#: The schedules of the paper's published configurations (batch size is the loader's: 128 for
#: CIFAR, 32 per GPU on 8 GPUs for ImageNet). ``DynamicSGS(..., **PUBLISHED_SCHEDULES["cifar10"])``.
PUBLISHED_SCHEDULES: dict[str, dict[str, Any]] = {
    "cifar10": dict(warmup=1, every=30, num_batches=20, k=5.0, diagonal_removal=False),
    "cifar100": dict(warmup=1, every=5, num_batches=2, k=5.0, diagonal_removal=False),
    "imagenet": dict(warmup=1, every=5, num_batches=2, k=5.0, diagonal_removal=True),
}

_SETTINGS = ("warmup", "every", "num_batches", "k", "diagonal_removal", "exclude_padding", "measure", "mode", "clip_order")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module whose parameter names are the user's: DDP / DataParallel / ``torch.compile``
    wrappers removed."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, wrappers) else model._orig_mod
    return model


class DynamicSGS:
    """Data-driven SGS on a schedule: ``G = 1`` before epoch ``warmup``; at ``epoch == warmup``
    and then at every epoch with ``epoch % every == 0``, ``G`` is recomputed from the first
    ``num_batches`` batches of ``loader`` and written into the attached handle in place.

    - ``dyn.epoch_start(epoch)`` at the start of each (0-based) epoch runs the schedule (a
      second call for the same epoch does nothing); ``dyn.refresh()`` recomputes now.
    - ``mode="grad"`` (default; the paper's ``g <- G ⊙ g`` before the step) or ``"update"``;
      ``strict`` as in :func:`~reparam.sgs.attach.attach_sgs` (grad mode is exact for SGD).
    - Gradient clipping: call ``dyn.clip_grad_norm_(max_norm)`` where you would call
      ``torch.nn.utils.clip_grad_norm_``. ``clip_order="before"`` (default, the official code's
      order) clips the raw gradient, which ``G`` then scales; ``"after"`` bounds the norm of the
      scaled gradient ``G ⊙ g`` the optimizer will see (grad mode only).
    - Distributed: the statistics are reduced over ``process_group`` (None: the default group
      when torch.distributed is initialised), so every rank gets the same ``G``, the one of a
      single process on the union of the ranks' batches. Every rank must call ``epoch_start``
      with the same epochs (the refresh is a collective). A DDP (or ``torch.compile``) wrapper
      is looked through: masks are keyed by the wrapped module's parameter names.
    - ``state_dict()`` holds ``G``, the epoch of the last refresh and the settings, so a resumed
      run keeps its ``G``; load it after ``optimizer.load_state_dict`` (it re-attaches).

    ``dyn.masks`` is ``{parameter name: G}`` (empty while ``G = 1``), ``dyn.handle`` the
    :class:`SGSHandle` (None while ``G = 1``), ``dyn.remove()`` detaches (idempotent).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: Iterable,
        *,
        warmup: int = 1,
        every: int | None = 5,
        num_batches: int = 2,
        k: float = 5.0,
        diagonal_removal: bool = False,
        exclude_padding: bool = False,
        measure: str = "nmi",
        mode: str = "grad",
        strict: bool = True,
        clip_order: str = "before",
        process_group: Any = None,
        progress: bool = False,
    ) -> None:
        _check_settings(warmup, every, num_batches, k, mode, clip_order)
        _check_measure(measure, diagonal_removal)
        self.model = _unwrapped(model)
        self.optimizer = optimizer
        self.loader = loader
        self.warmup, self.every, self.num_batches, self.k = int(warmup), every, int(num_batches), float(k)
        self.diagonal_removal, self.exclude_padding, self.measure = bool(diagonal_removal), bool(exclude_padding), measure
        self.mode, self.strict, self.clip_order = mode, strict, clip_order
        self.process_group, self.progress = process_group, progress
        self.last_refresh: int | None = None
        self._masks: dict[str, Tensor] = {}
        self._handle: SGSHandle | None = None

    # -- schedule ---------------------------------------------------------------------------
    def is_due(self, epoch: int) -> bool:
        """Whether the schedule refreshes ``G`` at the start of ``epoch``."""
        if epoch < self.warmup:
            return False
        return epoch == self.warmup or (bool(self.every) and epoch % self.every == 0)

    def epoch_start(self, epoch: int) -> bool:
        """Run the schedule at the start of ``epoch``; returns whether ``G`` was refreshed."""
        if not self.is_due(epoch) or self.last_refresh == epoch:
            return False
        self.refresh(epoch)
        return True

    def refresh(self, epoch: int | None = None) -> dict[str, Tensor]:
        """Recompute ``G`` from ``num_batches`` batches of the loader and apply it in place."""
        from reparam.sgs.streaming import masks_from_data

        masks = masks_from_data(
            self.model, self._batches(), k=self.k, diagonal_removal=self.diagonal_removal,
            exclude_padding=self.exclude_padding, measure=self.measure,
            process_group=self.process_group, progress=self.progress,
        )
        if not masks:
            raise ConfigError(
                "DynamicSGS: the model has no conv with a kernel larger than 1 in both directions that ran on the "
                "loader's batches, so there is no G to compute"
            )
        self._apply(masks)
        self.last_refresh = epoch
        return self.masks

    def _batches(self) -> list[Tensor]:
        """The inputs of the loader's first ``num_batches`` batches, on the model's device (a list:
        the statistic passes over them twice, ranges then counts)."""
        device = next(self.model.parameters()).device
        batches = []
        for batch in itertools.islice(iter(self.loader), self.num_batches):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, Tensor):
                raise ConfigError(
                    f"DynamicSGS: the loader yielded a {type(x).__name__}; it must yield tensors or (input, target) pairs"
                )
            batches.append(x.to(device, non_blocking=True))
        if not batches:
            raise ConfigError("DynamicSGS: the loader yielded no batch, so G cannot be computed")
        if len(batches) < self.num_batches:
            warnings.warn(f"DynamicSGS: the loader has {len(batches)} batches, fewer than num_batches={self.num_batches}; "
                          "G is computed from those", stacklevel=3)
        return batches

    def _apply(self, masks: Mapping[str, Tensor]) -> None:
        """Write ``masks`` into the handle in place, or attach one (first refresh, a new set of layers)."""
        masks = {name: g.detach().clone() for name, g in masks.items()}
        if self._handle is not None and set(masks) == set(self._masks):
            self._handle.set_masks(masks, model=self.model)
        else:
            self.remove()
            self._handle = attach_sgs(self.optimizer, masks, mode=self.mode, strict=self.strict, model=self.model)
        self._masks = masks

    # -- state ------------------------------------------------------------------------------
    @property
    def masks(self) -> dict[str, Tensor]:
        """``{parameter name: G}`` in use (empty while ``G = 1``)."""
        return dict(self._masks)

    @property
    def handle(self) -> SGSHandle | None:
        return self._handle

    @property
    def settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _SETTINGS}

    def state_dict(self) -> dict[str, Any]:
        """``G`` (on the CPU), the epoch of the last refresh and the settings."""
        return {
            "masks": {name: g.detach().cpu().clone() for name, g in self._masks.items()},
            "last_refresh": self.last_refresh,
            "settings": self.settings,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``G`` and the refresh epoch (re-attaching to the optimizer's current param
        groups, so call it after ``optimizer.load_state_dict``). Settings that differ from this
        object's are reported with a warning; this object's settings are kept."""
        missing = {"masks", "last_refresh", "settings"} - set(state)
        if missing:
            raise ConfigError(f"DynamicSGS.load_state_dict: the state has no {sorted(missing)}; "
                              "pass what DynamicSGS.state_dict() returned")
        changed = {n: (v, self.settings[n]) for n, v in state["settings"].items() if self.settings.get(n) != v}
        if changed:
            warnings.warn("DynamicSGS.load_state_dict: settings differ from the saved run (saved, now): "
                          + ", ".join(f"{n}={a!r}->{b!r}" for n, (a, b) in changed.items()), stacklevel=2)
        self.remove()
        self._masks = {}
        if state["masks"]:
            self._apply(state["masks"])
        self.last_refresh = state["last_refresh"]

    def remove(self) -> None:
        """Detach from the optimizer (idempotent); ``G`` and the schedule state are kept."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None

    # -- clipping ---------------------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, parameters: Iterable[Tensor] | None = None) -> Tensor:
        """Clip the gradients of ``parameters`` (default: the model's) in the order chosen by
        ``clip_order`` and return the total norm that was compared with ``max_norm``.

        ``"before"``: ``torch.nn.utils.clip_grad_norm_`` on the raw gradients (``G`` scales
        them afterwards). ``"after"``: the norm of the gradients as the optimizer will see them,
        ``G ⊙ g``; the clip factor ``c = min(1, max_norm / (norm + 1e-6))`` is applied to ``g``
        now, so the optimizer sees ``G ⊙ (c g) = c (G ⊙ g)``."""
        params = [p for p in (self.model.parameters() if parameters is None else parameters) if p.grad is not None]
        if self.clip_order == "before":
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
        scale = {id(self.model.get_parameter(name)): g for name, g in self._masks.items()}
        norms = [torch.linalg.vector_norm(p.grad * scale[id(p)].to(p.grad) if id(p) in scale else p.grad, norm_type)
                 for p in params]
        if not norms:
            return torch.zeros(())
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_([p.grad for p in params], coef)
        return total


def _check_settings(warmup: int, every: int | None, num_batches: int, k: float, mode: str, clip_order: str) -> None:
    problems = []
    if int(warmup) < 0:
        problems.append(f"warmup={warmup} must be >= 0")
    if every is not None and int(every) < 1:
        problems.append(f"every={every} must be >= 1 (or None: refresh only at the warm-up epoch)")
    if int(num_batches) < 1:
        problems.append(f"num_batches={num_batches} must be >= 1")
    if not float(k) >= 1:
        problems.append(f"k={k} must be >= 1 (the paper uses 5)")
    if mode not in ("grad", "update"):
        problems.append(f"mode={mode!r} is not supported; choose 'grad' (the paper's) or 'update'")
    if clip_order not in ("before", "after"):
        problems.append(f"clip_order={clip_order!r} is not supported; choose 'before' (the official code's) or 'after'")
    elif clip_order == "after" and mode != "grad":
        problems.append("clip_order='after' bounds the scaled gradient G ⊙ g, which exists only in mode='grad'")
    if problems:
        raise ConfigError("DynamicSGS: " + "; ".join(problems))


def _check_measure(measure: str, diagonal_removal: bool) -> None:
    if measure not in MEASURES:
        raise ConfigError(f"DynamicSGS: measure={measure!r} is not supported; choose one of {', '.join(MEASURES)}")
    if diagonal_removal and measure != "nmi":
        raise ConfigError(f"DynamicSGS: diagonal_removal applies to the 'nmi' measure only, not {measure!r}")
