"""``attach_sgs``: apply spatial gradient scaling through an optimizer's step hooks.

The handle follows the optimizer, never a copy of it: at every step it reads the live
``optimizer.param_groups`` (they survive ``load_state_dict`` and ``add_param_group``), re-checks
the exactness verdict when what it depends on changed, honours GradScaler's ``grad_scale`` /
``found_inf`` handed to fused optimizers, and re-casts what it keeps when a parameter changed
dtype or device.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
from torch import Tensor, nn

from reparam.errors import ConfigError, NotEquivalent, NotEquivalentWarning
from reparam.sgs.preconditioner import SpatialPreconditioner
from reparam.sgs.theory import (
    FALLBACK_MODE,
    coupled_decay,
    decoupled_decay,
    first_exact,
    inexact_reasons,
    verdict_inputs,
)

MaskValue = Union[Tensor, SpatialPreconditioner]

__all__ = ["NotEquivalentWarning", "SGSHandle", "attach_sgs"]  # the warning's home is reparam.errors

#: the parameters (by id) each optimizer has SGS attached to, across live handles
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, set[int]] = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class _Masked:
    """One masked parameter and everything SGS keeps for it, in the parameter's dtype and device.

    Either ``mask`` (``G`` as given, e.g. ``(kh, kw)``) or a non-diagonal ``preconditioner``
    ``P`` (applied on its own in grad mode, through ``workspace``). ``factor`` is what one
    foreach pass multiplies with: ``G`` (grad mode) or ``1 - G`` (update mode: the snapshot's
    weight in the lerp), a stride-0 view broadcast to the parameter, so no memory in proportion
    to the model. ``constant`` is ``C``; ``snapshot`` the weights before the step (update mode).

    A sharded parameter (a ``DTensor``, e.g. under FSDP2's ``fully_shard``) is handled through
    its local shard (:meth:`local`, which shares storage): ``factor``, ``constant``,
    ``snapshot`` and ``workspace`` are this rank's part, sliced along the sharded dims where
    ``G`` or ``C`` extend along them (``G`` of shape ``(kh, kw)`` stays a stride-0 view).
    """

    param: nn.Parameter
    name: str
    mask: Tensor | None
    preconditioner: SpatialPreconditioner | None
    constant: Tensor | None
    mode: str = "grad"
    factor: Tensor | None = None
    workspace: Tensor | None = None
    snapshot: Tensor | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    sharded: bool = False

    def fit(self, mode: str | None = None) -> None:
        """(Re)build everything derived from the parameter's dtype and device (masks, constants
        and preconditioners are re-cast from their current values, rounded as the parameter was)."""
        self.mode = mode or self.mode
        p = self.param
        like = {"dtype": p.dtype, "device": p.device}
        self.sharded = _is_sharded(p)
        fitted = self._shard if self.sharded else (lambda t: t.expand(p.shape))
        self.factor = self.workspace = self.snapshot = None
        if self.preconditioner is not None:
            self.preconditioner = SpatialPreconditioner(self.preconditioner.matrix.to(**like))
            self.workspace = torch.empty(self.local(p).numel(), **like)
        else:
            self.mask = self.mask.to(**like)
            self.factor = fitted(self.mask if self.mode == "grad" else 1.0 - self.mask)
        if self.constant is not None:
            self.constant = self.constant.to(**like)
            if self.sharded and self.constant.shape == p.shape:  # the full C: keep this rank's part only
                self.constant = self._shard(self.constant).contiguous()
        if self.mode == "update":
            self.snapshot = torch.empty_like(self.local(p), memory_format=torch.preserve_format)
        self.dtype, self.device = p.dtype, p.device

    def local(self, tensor: Tensor) -> Tensor:
        """The parameter (or its gradient) as the foreach passes see it: this rank's shard of a
        ``DTensor`` (sharing its storage, so in-place updates land in the ``DTensor``)."""
        return tensor.to_local() if self.sharded else tensor

    def _shard(self, full: Tensor) -> Tensor:
        """This rank's part of ``full`` (broadcastable to the sharded parameter): sliced along
        each sharded dim it extends along, broadcast (stride 0) along the others."""
        p = self.param
        aligned = full.reshape((1,) * (p.ndim - full.ndim) + tuple(full.shape))
        dims = {pl.dim % p.ndim for pl in p.placements if pl.is_shard()}
        if any(aligned.shape[d] != 1 for d in dims):
            target = [p.shape[d] if d in dims else aligned.shape[d] for d in range(p.ndim)]
            aligned = _distribute(aligned.expand(target).contiguous(), p.device_mesh, p.placements).to_local()
        return aligned.expand(self.local(p).shape)

    def follow(self) -> None:
        """Re-fit after ``model.float()`` / ``.to(device)`` changed the parameter."""
        if self.param.dtype != self.dtype or self.param.device != self.device:
            self.fit()

    @classmethod
    def build(cls, param: nn.Parameter, name: str, mask: MaskValue, constant: Tensor | None) -> _Masked:
        """A record from a mask checked by :func:`_checked_mask` (not yet fitted to a mode)."""
        record = cls(param, name, None, None, constant)
        record.set_mask(mask, fit=False)
        return record

    def set_mask(self, value: MaskValue, fit: bool = True) -> None:
        """Replace ``G`` (or ``P``), as checked by :func:`_checked_mask`."""
        is_matrix = isinstance(value, SpatialPreconditioner)
        self.mask, self.preconditioner = (None, value) if is_matrix else (value, None)
        if fit:
            self.fit()

    @property
    def tensors(self) -> list[Tensor]:
        """What this record holds in memory."""
        matrix = None if self.preconditioner is None else self.preconditioner.matrix
        return [t for t in (self.mask, matrix, self.constant, self.workspace, self.snapshot) if t is not None]


class _Decay(NamedTuple):
    """A group's decoupled decay this step: the optimizer's ``W <- factor W``, and ``amount =
    1 - factor`` (exact), the ``lr wd`` with which the pull toward ``C`` is added back."""

    factor: float | Tensor
    amount: float | Tensor


class SGSHandle:
    """Returned by :func:`attach_sgs`; ``remove()`` detaches the hooks, ``set_masks()`` replaces masks.

    Works with ``optimizer.step()`` and with ``optimizer.step(closure)``: the closure is wrapped
    so that gradients are scaled (grad mode) or weights snapshotted (update mode) right after it
    has computed them, before the optimizer uses them.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, records: list[_Masked], mode: str, strict: bool = True,
        warned: tuple[str, ...] = (),
    ) -> None:
        self.optimizer = optimizer
        self.mode = mode
        self.strict = strict
        self._records = records
        self._warned = set(warned)  # reasons already warned about (strict=False)
        self._groups_key: tuple | None = None
        self._by_group: list[tuple[dict, list[_Masked]]] = []  # live groups with their records
        self._active: list[tuple[dict, list[_Masked]]] = []  # the same, records with a gradient
        self._verdict_key: tuple | None = None
        self._prepared = False
        if mode == "update":
            _foreach_lerp_takes_tensor_weights()  # probe once, outside the step
        for record in records:
            record.fit(mode)
        self._verdict_key = verdict_inputs(optimizer, [g for g, _ in self._live_groups()], self._nondiagonal())
        _ATTACHED.setdefault(optimizer, set()).update(id(p) for p in self.parameters)
        self._hooks = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [r.param for r in self._records]

    @property
    def masks(self) -> dict[nn.Parameter, MaskValue]:
        """``{parameter: G}`` as applied now (in the parameter's dtype; a non-diagonal
        :class:`SpatialPreconditioner` where one is attached)."""
        return {r.param: r.mask if r.preconditioner is None else r.preconditioner for r in self._records}

    @property
    def state_bytes(self) -> int:
        """Memory the handle holds: the masks (as given, not broadcast), the snapshots (update
        mode), preconditioners and their workspaces, and constant kernels."""
        tensors = [t for r in self._records for t in r.tensors]
        storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())  # a mask shared by several parameters counts once

    def set_masks(self, masks: Mapping[nn.Parameter | str, MaskValue], model: nn.Module | None = None) -> None:
        """Replace ``G`` of parameters this handle has attached (names resolved with ``model``),
        validated as :func:`attach_sgs` validates masks, all or none. The optimizer's state is
        untouched; the new masks apply from the next step, in either mode."""
        name_of = _namer(self.optimizer, model)
        resolved = _resolve_keys(masks, model, "masks", name_of, caller="set_masks")
        record_of = {id(r.param): r for r in self._records}
        foreign = [name_of(p) for p in resolved if id(p) not in record_of]
        if foreign:
            raise ConfigError(
                f"set_masks: {', '.join(foreign)} not attached by this handle; set_masks replaces the masks of "
                "attached parameters only (attach_sgs the others)"
            )
        checked = {id(p): _checked_mask(p, value, name_of(p)) for p, value in resolved.items()}
        if self.mode == "update" and any(isinstance(v, SpatialPreconditioner) for v in checked.values()):
            raise ConfigError("set_masks: a non-diagonal SpatialPreconditioner can only be applied in mode 'grad'")
        for key, value in checked.items():
            record_of[key].set_mask(value)

    def remove(self) -> None:
        """Detach from the optimizer (idempotent); the parameters can then be attached again."""
        for hook in self._hooks:
            hook.remove()
        if self._hooks:
            _ATTACHED.get(self.optimizer, set()).difference_update(id(p) for p in self.parameters)
        self._hooks = []

    def __enter__(self) -> SGSHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- following the optimizer ------------------------------------------------------------
    def _nondiagonal(self) -> bool:
        return any(r.preconditioner is not None for r in self._records)

    def _live_groups(self) -> list[tuple[dict, list[_Masked]]]:
        """The optimizer's current param groups that hold masked parameters, with their records.
        Recomputed when the groups changed (``load_state_dict`` replaces the dicts,
        ``add_param_group`` appends one); the old dicts stay referenced, so ids are not reused."""
        groups = self.optimizer.param_groups
        key = tuple((id(g), id(g["params"]), len(g["params"])) for g in groups)
        if key != self._groups_key:
            index = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
            lost = [r.name for r in self._records if id(r.param) not in index]
            if lost:
                raise ConfigError(
                    f"attach_sgs: {', '.join(lost)} with SGS attached is no longer optimized by this optimizer "
                    "(its param groups changed); remove() the handle and attach again"
                )
            members: dict[int, list[_Masked]] = {}
            for record in self._records:
                members.setdefault(index[id(record.param)], []).append(record)
            self._by_group = [(groups[gi], members[gi]) for gi in sorted(members)]
            self._groups_key = key
        return self._by_group

    def _check_verdict(self) -> None:
        """Re-decide exactness when what it depends on changed since attaching (a weight-decay
        schedule, a loaded checkpoint, new masks): raise (strict) or warn once, as attach_sgs does."""
        groups = [g for g, _ in self._by_group]
        key = verdict_inputs(self.optimizer, groups, self._nondiagonal())
        if key == self._verdict_key:
            return
        reason = inexact_reasons(self.optimizer, groups, self._nondiagonal())[self.mode]
        if reason is not None:
            message = f"attach_sgs: mode={self.mode!r} is no longer exact (the optimizer changed after attaching): {reason}"
            if self.strict:  # the key is not recorded: every step raises until it is fixed
                raise NotEquivalent(message + "; undo the change, or attach with strict=False to go on anyway")
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(message, NotEquivalentWarning, stacklevel=4)
        self._verdict_key = key

    # -- hooks -----------------------------------------------------------------------------
    def _pre_step(self, optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Before the step: follow the live groups and parameters, re-check the verdict, then
        scale the gradients (grad mode) or snapshot the weights (update mode). Given a closure
        (``args`` is ``(optimizer, *step_args)``), the gradients do not exist yet: wrap the closure
        to do it right after it has computed them (the optimizer calls it inside ``step``)."""
        self._prepared = False
        self._live_groups()
        self._check_verdict()
        for record in self._records:
            record.follow()
        if kwargs.get("closure") is not None:
            return args, {**kwargs, "closure": self._after(kwargs["closure"])}
        if len(args) > 1 and args[1] is not None:
            return (args[0], self._after(args[1]), *args[2:]), kwargs
        self._prepare()
        return None

    def _after(self, closure: Callable[[], object]) -> Callable[[], object]:
        def closure_then_prepare() -> object:
            loss = closure()
            # grad mode scales each fresh gradient; update mode snapshots the weights as they
            # were before the step, i.e. at the first call
            if self.mode == "grad" or not self._prepared:
                self._prepare()
            return loss

        return closure_then_prepare

    @torch.no_grad()
    def _prepare(self) -> None:
        self._active = [(g, [r for r in records if r.param.grad is not None]) for g, records in self._by_group]
        if self.mode == "grad":
            self._scale_gradients()
        else:
            records = [r for _, rs in self._active for r in rs]
            _copy_all([r.snapshot for r in records], [r.local(r.param) for r in records])
        self._prepared = True

    @torch.no_grad()
    def _post_step(self, optimizer, args=None, kwargs=None) -> None:
        if not self._prepared:
            raise RuntimeError(
                f"attach_sgs: {type(optimizer).__name__}.step(closure) never called the closure, so SGS could "
                "not see the gradients of this step; compute the gradients before calling step()"
            )
        self._prepared = False
        decays = [self._decoupled(group, records) for group, records in self._active]
        if self.mode == "update":
            self._scale_updates(decays)
        for (_, records), decay in zip(self._active, decays):
            with_c = [r for r in records if r.constant is not None]
            if decay is not None and with_c:
                # decoupled decay pulls the merged kernel toward 0, the branches pull W - C: add back (1 - f) C
                _add_product([r.local(r.param) for r in with_c], [r.constant for r in with_c], decay.amount)

    def _decoupled(self, group: dict, records: list[_Masked]) -> _Decay | None:
        """The group's decoupled decay factor ``f = 1 - lr wd`` computed as torch's optimizers do
        (Python floats for a float lr; a tensor lr in its own dtype, or in the parameters' dtype
        inside a fused kernel), none on a step GradScaler skipped (``found_inf``); None if no decay."""
        wd = decoupled_decay(self.optimizer, group)
        if not wd or not records:
            return None
        lr, like = group["lr"], {"dtype": records[0].dtype, "device": records[0].device}
        if isinstance(lr, Tensor):
            lr = lr.to(**like) if group.get("fused") else lr.to(device=like["device"])
        factor = 1 - lr * wd
        found_inf = getattr(self.optimizer, "found_inf", None)  # set by GradScaler for fused optimizers
        if found_inf is None:
            return _Decay(factor, 1 - factor)
        amount = (1 - factor) * (1 - found_inf.to(**like))
        return _Decay(1 - amount, amount)

    # -- the two modes ------------------------------------------------------------------------
    @torch.no_grad()
    def _scale_gradients(self) -> None:
        """``g <- G ⊙ g`` for every masked gradient in one foreach pass (``g <- P g`` for a
        non-diagonal preconditioner), then ``g <- g - wd C`` under coupled decay: the optimizer's
        ``G g + wd W`` becomes ``G g + wd (W - C)``, the decay the branches see. A fused optimizer
        stepping under GradScaler divides the gradient by ``optimizer.grad_scale``: the
        correction is multiplied by it first."""
        records = [r for _, rs in self._active for r in rs]
        for r in records:
            if r.preconditioner is not None:
                r.preconditioner.apply_(r.local(r.param.grad), r.workspace)
        masked = [r for r in records if r.preconditioner is None]
        if masked:
            torch._foreach_mul_([r.local(r.param.grad) for r in masked], [r.factor for r in masked])
        scale = getattr(self.optimizer, "grad_scale", None)
        for group, records in self._active:
            wd = coupled_decay(self.optimizer, group)
            with_c = [r for r in records if r.constant is not None]
            if wd and with_c:
                sign = 1.0 if group.get("maximize", False) else -1.0  # +wd C when the optimizer negates g
                _add_product([r.local(r.param.grad) for r in with_c], [r.constant for r in with_c], sign * wd, scale)

    @torch.no_grad()
    def _scale_updates(self, decays: list[_Decay | None]) -> None:
        """``W <- S + G ⊙ (W_after - S)`` with ``S = f W_before`` under decoupled decay (else
        ``S = W_before``): the optimizer's step scaled by ``G``, its decay left unscaled. One
        foreach ``lerp(W_after, S, 1 - G) = W_after + (1 - G) ⊙ (S - W_after)``. On a skipped
        step ``W_after = W_before = S``, so nothing moves."""
        for (_, records), decay in zip(self._active, decays):
            if decay is not None and records:
                snapshots = [r.snapshot for r in records]
                factor = decay.factor if not isinstance(decay.factor, Tensor) else [decay.factor] * len(snapshots)
                torch._foreach_mul_(snapshots, factor)
        records = [r for _, rs in self._active for r in rs]
        _lerp_all([r.local(r.param) for r in records], [r.snapshot for r in records], [r.factor for r in records])


@functools.cache
def _dtensor_api() -> tuple[type, Callable] | None:
    """``(DTensor, distribute_tensor)`` of this torch (public from 2.5, private before), or None."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor, distribute_tensor
        except ImportError:
            return None
    return DTensor, distribute_tensor


def _is_sharded(tensor: Tensor) -> bool:
    api = _dtensor_api() if type(tensor) is not nn.Parameter and type(tensor) is not Tensor else None
    return api is not None and isinstance(tensor, api[0])


def _distribute(full: Tensor, mesh, placements) -> Tensor:
    """``full`` as a DTensor placed like a parameter, each rank slicing its own copy (no
    communication; before torch 2.5, ``distribute_tensor`` broadcasts from rank 0: same values)."""
    distribute_tensor = _dtensor_api()[1]
    try:
        return distribute_tensor(full, mesh, placements, src_data_rank=None)
    except TypeError:
        return distribute_tensor(full, mesh, placements)


def _add_product(targets: list[Tensor], sources: list[Tensor], value: float | Tensor, scale: Tensor | None = None) -> None:
    """``targets[k] += value * scale * sources[k]`` in one foreach pass (``value`` or ``scale``
    may be 0-dim tensors: GradScaler's scale, a tensor learning rate)."""
    if isinstance(value, Tensor):
        value, scale = 1.0, value if scale is None else value * scale
    if scale is None:
        torch._foreach_add_(targets, sources, alpha=value)
    else:
        torch._foreach_addcmul_(targets, sources, [scale.to(targets[0].device)] * len(targets), value=value)


def _copy_all(destinations: list[Tensor], sources: list[Tensor]) -> None:
    if not destinations:
        return
    if hasattr(torch, "_foreach_copy_"):  # torch >= 2.2
        torch._foreach_copy_(destinations, sources)
    else:
        for dst, src in zip(destinations, sources):
            dst.copy_(src)


@functools.cache
def _foreach_lerp_takes_tensor_weights() -> bool:
    try:
        t = torch.zeros(1)
        torch._foreach_lerp_([t], [t], [t])
        return True
    except (AttributeError, RuntimeError, TypeError):
        return False


def _lerp_all(tensors: list[Tensor], toward: list[Tensor], weights: list[Tensor]) -> None:
    """``tensors[k] <- tensors[k] + weights[k] ⊙ (toward[k] - tensors[k])`` for every ``k``, in place."""
    if not tensors:
        return
    if _foreach_lerp_takes_tensor_weights():
        torch._foreach_lerp_(tensors, toward, weights)
    else:
        for tensor, end, weight in zip(tensors, toward, weights):
            tensor.lerp_(end, weight)


# -- validation -------------------------------------------------------------------------------
def _namer(optimizer: torch.optim.Optimizer, model: nn.Module | None) -> Callable[[Tensor], str]:
    """How errors name a parameter: its name in ``model``, else its position and shape."""
    names = {} if model is None else {id(p): n for n, p in model.named_parameters()}
    position_of = {id(p): k for k, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}

    def name_of(p: Tensor) -> str:
        if id(p) in names:
            return names[id(p)]
        where = f"#{position_of[id(p)]} " if id(p) in position_of else ""
        return f"parameter {where}of shape {tuple(p.shape)}"

    return name_of


def _resolve_keys(
    masks: Mapping, model: nn.Module | None, what: str, name_of: Callable[[Tensor], str], caller: str = "attach_sgs"
) -> dict[nn.Parameter, MaskValue]:
    """Map name keys to parameters; reject a non-mapping and a parameter given twice."""
    if not isinstance(masks, Mapping):
        raise ConfigError(
            f"{caller}: {what} must be a mapping {{parameter or name: value}}, got a {type(masks).__name__} "
            "(e.g. {conv.weight: block.sgs_mask()})"
        )
    resolved: dict[nn.Parameter, MaskValue] = {}
    missing = []
    for key, value in masks.items():
        if isinstance(key, str):
            if model is None:
                raise ConfigError(f"{caller}: {what} are keyed by parameter name ({key!r}); pass model= to resolve names")
            try:
                key = model.get_parameter(key)
            except AttributeError:
                missing.append(key)
                continue
        if key in resolved:
            raise ConfigError(f"{caller}: {what} give {name_of(key)} twice (by name and by object?)")
        resolved[key] = value
    if missing:
        raise ConfigError(f"{caller}: {what}: no parameter named {missing} in the model")
    return resolved


def _real_finite(value: object, name: str, what: str) -> Tensor:
    """``value`` as a tensor, rejected (naming ``name``) if complex or not finite."""
    tensor = torch.as_tensor(value)
    if tensor.is_complex():
        raise ConfigError(f"{name}: the {what} is complex ({tensor.dtype}); SGS scales real gradients, give a real tensor")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ConfigError(f"{name}: the {what} has non-finite values (NaN or inf)")
    return tensor


@torch.no_grad()
def _checked_mask(param: nn.Parameter, value: MaskValue, name: str) -> Tensor | SpatialPreconditioner:
    """``G`` in the parameter's dtype and device, checked (real, finite, non-negative,
    broadcastable to the parameter), or a non-diagonal preconditioner (a diagonal one is the
    mask ``G = diag(P)`` over the taps)."""
    if isinstance(value, SpatialPreconditioner):
        taps = param.shape[-2] * param.shape[-1] if param.ndim == 4 else -1
        if param.ndim != 4 or value.taps != taps:
            raise ConfigError(
                f"{name}: a preconditioner over {value.taps} taps does not fit a parameter of shape {tuple(param.shape)}"
            )
        matrix = _real_finite(value.matrix, name, "preconditioner").to(device=param.device, dtype=param.dtype)
        if not value.is_diagonal():
            return SpatialPreconditioner(matrix)
        value = torch.diagonal(matrix).reshape(param.shape[-2:])
    mask = _real_finite(value, name, "mask").to(device=param.device, dtype=param.dtype)
    if (mask < 0).any():
        raise ConfigError(f"{name}: the mask has negative values; G scales each tap's gradient by a count (>= 0)")
    try:
        mask.expand(param.shape)
    except RuntimeError:
        kernel = f" (kernel size {tuple(param.shape[-2:])})" if param.ndim == 4 else ""
        raise ConfigError(
            f"{name}: mask of shape {tuple(mask.shape)} is not broadcastable to the parameter shape "
            f"{tuple(param.shape)}{kernel}; give it as (kh, kw) or broadcastable to the weight"
        ) from None
    return mask


def _checked_constant(param: nn.Parameter, value: Tensor, name: str) -> Tensor:
    """``C`` in the parameter's dtype and device, checked (real, finite, the parameter's shape)."""
    c = _real_finite(value, name, "constant kernel").to(device=param.device, dtype=param.dtype)
    if tuple(c.shape) != tuple(param.shape):
        raise ConfigError(f"{name}: constant kernel of shape {tuple(c.shape)} != parameter shape {tuple(param.shape)}")
    return c


def _records(
    optimizer: torch.optim.Optimizer, masks: Mapping, constants: Mapping | None, model: nn.Module | None
) -> list[_Masked]:
    """One validated record per masked parameter (not yet fitted to a mode)."""
    name_of = _namer(optimizer, model)
    masks_ = _resolve_keys(masks, model, "masks", name_of)
    constants_ = _resolve_keys(constants or {}, model, "constant_kernels", name_of)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    records = []
    for param, value in masks_.items():
        name = name_of(param)
        if id(param) not in optimized:
            raise ConfigError(f"attach_sgs: {name} is not optimized by this optimizer")
        checked = _checked_mask(param, value, name)
        constant = _checked_constant(param, constants_.pop(param), name) if param in constants_ else None
        records.append(_Masked.build(param, name, checked, constant))
    if constants_:
        raise ConfigError(
            "attach_sgs: constant_kernels given for parameters without a mask: " + ", ".join(map(name_of, constants_))
        )
    attached = _ATTACHED.get(optimizer, set())
    twice = [r.name for r in records if id(r.param) in attached]
    if twice:
        raise ConfigError(
            f"attach_sgs: {', '.join(twice)} already has SGS attached on this optimizer; attaching again would "
            "scale it twice. Call remove() on the earlier handle first"
        )
    return records


def _choose_mode(reasons: dict[str, str | None], mode: str, strict: bool) -> tuple[str, tuple[str, ...]]:
    """The mode to apply and the reasons warned about (strict=False), or NotEquivalent."""
    if mode == "auto":
        chosen = first_exact(reasons)
        if chosen is not None:
            return chosen, ()
        message = f"attach_sgs: no exact SGS mode for this configuration: grad: {reasons['grad']}; update: {reasons['update']}"
        if strict:
            raise NotEquivalent(message)
        warnings.warn(message + f"; using {FALLBACK_MODE!r}", NotEquivalentWarning, stacklevel=3)
        return FALLBACK_MODE, (reasons[FALLBACK_MODE],)
    if reasons[mode] is None:
        return mode, ()
    message = f"attach_sgs: mode={mode!r} is not exact here: {reasons[mode]}"
    if strict:
        raise NotEquivalent(message + " (pass strict=False to use it anyway)")
    warnings.warn(message, NotEquivalentWarning, stacklevel=3)
    return mode, (reasons[mode],)


def attach_sgs(
    optimizer: torch.optim.Optimizer,
    masks: Mapping[nn.Parameter | str, MaskValue],
    mode: str = "auto",
    strict: bool = True,
    constant_kernels: Mapping[nn.Parameter | str, Tensor] | None = None,
    model: nn.Module | None = None,
) -> SGSHandle:
    """Make ``optimizer`` train each masked parameter as if it were a branched block.

    ``masks`` maps a parameter (or, with ``model``, its name) to ``G`` of shape ``(kh, kw)``
    or broadcastable to the weight (real, finite, >= 0), or to a :class:`SpatialPreconditioner`
    ``P``. A parameter can have SGS attached only once per optimizer at a time (``remove()``
    the earlier handle); ``handle.set_masks()`` replaces masks during training.

    - ``mode="grad"``: ``g <- G ⊙ g`` (``P g``) before the step, and ``g <- g - wd C`` for
      constant kernels under coupled weight decay. Exact for the SGD family.
    - ``mode="update"``: the optimizer steps on the raw gradient, then
      ``W <- W_dec + G ⊙ (W_after - W_dec)`` with ``W_dec = (1 - lr wd) W_before`` under
      decoupled decay (which stays unscaled and pulls toward ``C``). Exact for element-wise
      adaptive optimizers (Adam, AdamW, Adamax, NAdam, RAdam, Adagrad, RMSprop, Adadelta)
      without coupled weight decay. Costs a snapshot of the masked weights (one copy before
      the step, one fused lerp after it).
    - ``optimizer.step(closure)`` works in both modes (the closure is wrapped so that the
      gradients it computes are used). Optimizers are classified by exact type: a subclass
      of ``SGD`` / ``Adam`` may change the update rule and counts as unknown.
    - ``mode="auto"``: the exact one for this optimizer. If none exists (or an explicit mode
      is not exact), ``strict=True`` raises :class:`reparam.NotEquivalent` with the reason and
      ``strict=False`` warns (:class:`NotEquivalentWarning`) and goes on (``"grad"`` for auto).

    The handle reads the live ``optimizer.param_groups`` at every step (so it survives
    ``optimizer.load_state_dict`` and ``add_param_group``) and re-checks exactness when the
    weight decay changes, raising or warning once as above. Under GradScaler it is exact with
    fused optimizers too (the ``C`` correction is scale-correct; a skipped step moves nothing).
    Masks, constants and snapshots follow the parameter's dtype and device (``model.float()``).
    Sharded ``DTensor`` parameters (FSDP2's ``fully_shard``) are scaled shard by shard, each
    rank keeping only its part of ``G``, ``C`` and the snapshot (attach after sharding).

    ``constant_kernels`` maps parameters to the parameter-free part ``C`` of their merged
    kernel (RepVGG's identity without BN) so that weight decay pulls toward ``C``.
    The masks are kept as given (e.g. ``(kh, kw)``) and broadcast as stride-0 views, so masks
    hold no memory in proportion to the model; update mode keeps a snapshot of the masked
    weights and a non-diagonal preconditioner a workspace the size of its parameter
    (``handle.state_bytes``).
    """
    if mode not in ("auto", "grad", "update"):
        raise ConfigError(f"attach_sgs: mode={mode!r} is not supported; choose 'auto', 'grad' or 'update'")
    records = _records(optimizer, masks, constant_kernels, model)
    ids = {id(r.param) for r in records}
    groups = [g for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])]
    nondiagonal = any(r.preconditioner is not None for r in records)  # diagonal ones became masks
    chosen, warned = _choose_mode(inexact_reasons(optimizer, groups, nondiagonal), mode, strict)
    if chosen == "update" and nondiagonal:
        raise ConfigError("attach_sgs: a non-diagonal SpatialPreconditioner can only be applied in mode 'grad'")
    return SGSHandle(optimizer, records, chosen, strict, warned)
