"""``attach_sgs``: apply spatial gradient scaling through an optimizer's step hooks."""
from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor, nn

from reparam.errors import ConfigError, NotEquivalent
from reparam.sgs.preconditioner import SpatialPreconditioner
from reparam.sgs.theory import FALLBACK_MODE, coupled_decay, decoupled_decay, first_exact, inexact_reasons

MaskValue = Union[Tensor, SpatialPreconditioner]


class NotEquivalentWarning(UserWarning):
    """SGS was attached in a way that does not reproduce branched training exactly."""


#: the parameters (by id) each optimizer has SGS attached to, across live handles
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, set[int]] = weakref.WeakKeyDictionary()


@dataclass
class _Bucket:
    """The masked parameters of one optimizer param group.

    ``masks[i]`` is ``G`` as given (e.g. ``(kh, kw)``), cast to the parameter's dtype and
    device (an unused scalar 1 for a parameter with a non-diagonal preconditioner, which is
    applied on its own, in grad mode). ``factors[i]`` is what one foreach pass multiplies with:
    ``G`` (grad mode) or ``1 - G`` (update mode) broadcast to the parameter's shape as a
    stride-0 view, so no memory in proportion to the model."""

    group: dict
    params: list[nn.Parameter] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    factors: list[Tensor] = field(default_factory=list)
    constants: dict[int, Tensor] = field(default_factory=dict)  # index in params -> C
    preconditioners: dict[int, SpatialPreconditioner] = field(default_factory=dict)
    workspaces: dict[int, Tensor] = field(default_factory=dict)  # index -> buffer for P g
    snapshots: list[Tensor] = field(default_factory=list)
    active: list[int] = field(default_factory=list)


class SGSHandle:
    """Returned by :func:`attach_sgs`; ``remove()`` detaches the hooks.

    Works with ``optimizer.step()`` and with ``optimizer.step(closure)``: the closure is wrapped
    so that gradients are scaled (grad mode) or weights snapshotted (update mode) right after it
    has computed them, before the optimizer uses them.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, buckets: list[_Bucket], mode: str) -> None:
        self.optimizer = optimizer
        self.mode = mode
        self._buckets = buckets
        self._prepared = False
        if mode == "update":
            _foreach_lerp_takes_tensor_weights()  # probe once, outside the step
            for bucket in buckets:
                bucket.snapshots = [torch.empty_like(p, memory_format=torch.preserve_format) for p in bucket.params]
        for bucket in buckets:
            # the weight of the snapshot in the update-mode lerp is 1 - G
            bucket.factors = [
                (m if mode == "grad" else 1.0 - m).expand(p.shape) for m, p in zip(bucket.masks, bucket.params)
            ]
            for i in bucket.preconditioners:
                bucket.workspaces[i] = torch.empty(bucket.params[i].numel(), dtype=bucket.params[i].dtype,
                                                   device=bucket.params[i].device)
        _ATTACHED.setdefault(optimizer, set()).update(id(p) for p in self.parameters)
        self._hooks = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for b in self._buckets for p in b.params]

    @property
    def state_bytes(self) -> int:
        """Memory the handle holds: the masks (as given, not broadcast), the snapshots (update
        mode), preconditioner workspaces and constant kernels."""
        tensors = [t for b in self._buckets for t in (*b.masks, *b.snapshots, *b.workspaces.values(), *b.constants.values())]
        storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())  # a mask shared by several parameters counts once

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

    # -- hooks -----------------------------------------------------------------------------
    def _pre_step(self, optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Before the step: scale the gradients (grad mode) or snapshot the weights (update
        mode). Given a closure, the gradients do not exist yet: wrap the closure to do it right
        after the closure has computed them (the optimizer calls it inside ``step``)."""
        self._prepared = False
        if kwargs.get("closure") is not None:
            return args, {**kwargs, "closure": self._after(kwargs["closure"])}
        first = 1 if args and args[0] is optimizer else 0  # torch passes the optimizer in args
        if len(args) > first and args[first] is not None:
            return (*args[:first], self._after(args[first]), *args[first + 1 :]), kwargs
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

    def _prepare(self) -> None:
        for bucket in self._buckets:
            bucket.active = [i for i, p in enumerate(bucket.params) if p.grad is not None]
        if self.mode == "grad":
            self._scale_gradients()
        else:
            self._snapshot()
        self._prepared = True

    def _post_step(self, optimizer, args=None, kwargs=None) -> None:
        if not self._prepared:
            raise RuntimeError(
                f"attach_sgs: {type(optimizer).__name__}.step(closure) never called the closure, so SGS could "
                "not see the gradients of this step; compute the gradients before calling step()"
            )
        self._prepared = False
        if self.mode == "update":
            self._scale_updates()
        self._decay_toward_constants()

    # -- grad mode ---------------------------------------------------------------------------
    @torch.no_grad()
    def _scale_gradients(self) -> None:
        """``g <- G ⊙ g`` for every masked gradient in one foreach pass (``g <- P g`` for a
        non-diagonal preconditioner), then ``g <- g - wd C`` under coupled decay: the optimizer's
        ``G g + wd W`` becomes ``G g + wd (W - C)``, the decay the branches see."""
        grads, factors = [], []
        for bucket in self._buckets:
            for i in bucket.active:
                if i in bucket.preconditioners:
                    bucket.preconditioners[i].apply_(bucket.params[i].grad, bucket.workspaces[i])
                else:
                    grads.append(bucket.params[i].grad)
                    factors.append(bucket.factors[i])
        if grads:
            torch._foreach_mul_(grads, factors)
        for bucket in self._buckets:
            wd = coupled_decay(self.optimizer, bucket.group)
            with_c = [i for i in bucket.active if i in bucket.constants]
            if wd and with_c:
                # +wd C when the optimizer negates the gradient for maximize
                sign = 1.0 if bucket.group.get("maximize", False) else -1.0
                torch._foreach_add_(
                    [bucket.params[i].grad for i in with_c], [bucket.constants[i] for i in with_c], alpha=sign * wd
                )

    @torch.no_grad()
    def _decay_toward_constants(self) -> None:
        """Decoupled decay ``W <- (1 - lr wd) W`` pulls the merged kernel toward 0, while each
        branch decays only its own parameters, i.e. ``W - C`` toward 0: add back ``lr wd C``."""
        for bucket in self._buckets:
            wd = decoupled_decay(self.optimizer, bucket.group)
            with_c = [i for i in bucket.active if i in bucket.constants]
            if wd and with_c:
                lr = float(bucket.group["lr"])
                torch._foreach_add_([bucket.params[i] for i in with_c], [bucket.constants[i] for i in with_c], alpha=lr * wd)

    # -- update mode -------------------------------------------------------------------------
    @torch.no_grad()
    def _snapshot(self) -> None:
        _copy_all(
            [b.snapshots[i] for b in self._buckets for i in b.active],
            [b.params[i] for b in self._buckets for i in b.active],
        )

    @torch.no_grad()
    def _scale_updates(self) -> None:
        """``W <- S + G ⊙ (W_after - S)`` with ``S = (1 - lr wd) W_before`` under decoupled decay
        (else ``S = W_before``): the optimizer's step scaled by ``G``, its decay left unscaled.
        Computed as one foreach ``lerp(W_after, S, 1 - G) = W_after + (1 - G) ⊙ (S - W_after)``."""
        params, starts, weights = [], [], []
        for bucket in self._buckets:
            if not bucket.active:
                continue
            before = [bucket.snapshots[i] for i in bucket.active]
            wd = decoupled_decay(self.optimizer, bucket.group)
            if wd:
                torch._foreach_mul_(before, 1.0 - float(bucket.group["lr"]) * wd)
            params += [bucket.params[i] for i in bucket.active]
            starts += before
            weights += [bucket.factors[i] for i in bucket.active]
        _lerp_all(params, starts, weights)


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


def _lerp_all(starts: list[Tensor], ends: list[Tensor], weights: list[Tensor]) -> None:
    """``starts[k] <- starts[k] + weights[k] ⊙ (ends[k] - starts[k])`` for every ``k``."""
    if not starts:
        return
    if _foreach_lerp_takes_tensor_weights():
        torch._foreach_lerp_(starts, ends, weights)
    else:
        for start, end, weight in zip(starts, ends, weights):
            start.lerp_(end, weight)


def _names(model: nn.Module | None) -> dict[int, str]:
    return {} if model is None else {id(p): n for n, p in model.named_parameters()}


def _resolve_keys(
    masks: Mapping, model: nn.Module | None, what: str, name_of: Callable[[Tensor], str]
) -> dict[nn.Parameter, MaskValue]:
    """Map name keys to parameters; reject a non-mapping and a parameter given twice."""
    if not isinstance(masks, Mapping):
        raise ConfigError(
            f"attach_sgs: {what} must be a mapping {{parameter or name: value}}, got a {type(masks).__name__} "
            "(e.g. {conv.weight: block.sgs_mask()})"
        )
    resolved: dict[nn.Parameter, MaskValue] = {}
    missing = []
    for key, value in masks.items():
        if isinstance(key, str):
            if model is None:
                raise ConfigError(f"{what} are keyed by parameter name ({key!r}); pass model= to resolve names")
            try:
                key = model.get_parameter(key)
            except AttributeError:
                missing.append(key)
                continue
        if key in resolved:
            raise ConfigError(f"attach_sgs: {what} give {name_of(key)} twice (by name and by object?)")
        resolved[key] = value
    if missing:
        raise ConfigError(f"{what}: no parameter named {missing} in the model")
    return resolved


@torch.no_grad()
def _prepare_mask(param: nn.Parameter, value: MaskValue, name: str) -> Tensor | SpatialPreconditioner:
    """``G`` in the parameter's dtype and device, checked to broadcast to the parameter, or a
    non-diagonal preconditioner (a diagonal one is the mask ``G = diag(P)`` over the taps)."""
    if isinstance(value, SpatialPreconditioner):
        taps = param.shape[-2] * param.shape[-1] if param.ndim == 4 else -1
        if param.ndim != 4 or value.taps != taps:
            raise ConfigError(
                f"{name}: a preconditioner over {value.taps} taps does not fit a parameter of shape {tuple(param.shape)}"
            )
        matrix = value.matrix.to(device=param.device, dtype=param.dtype)
        if not value.is_diagonal():
            return SpatialPreconditioner(matrix)
        value = torch.diagonal(matrix).reshape(param.shape[-2:])
    mask = torch.as_tensor(value).to(device=param.device, dtype=param.dtype)
    if not torch.isfinite(mask).all():
        raise ConfigError(f"{name}: the mask has non-finite values")
    try:
        mask.expand(param.shape)
    except RuntimeError:
        kernel = f" (kernel size {tuple(param.shape[-2:])})" if param.ndim == 4 else ""
        raise ConfigError(
            f"{name}: mask of shape {tuple(mask.shape)} is not broadcastable to the parameter shape "
            f"{tuple(param.shape)}{kernel}; give it as (kh, kw) or broadcastable to the weight"
        ) from None
    return mask


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
    or broadcastable to the weight, or to a :class:`SpatialPreconditioner` ``P``. A parameter
    can have SGS attached only once per optimizer at a time (``remove()`` the earlier handle).

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

    ``constant_kernels`` maps parameters to the parameter-free part ``C`` of their merged
    kernel (RepVGG's identity without BN) so that weight decay pulls toward ``C``.
    Returns a handle; ``handle.remove()`` detaches. The masks are kept as given (e.g.
    ``(kh, kw)``) and broadcast as stride-0 views, so masks hold no memory in proportion to the
    model; update mode keeps a snapshot of the masked weights and a non-diagonal
    preconditioner a workspace the size of its parameter (``handle.state_bytes``).
    """
    if mode not in ("auto", "grad", "update"):
        raise ConfigError(f"attach_sgs: mode={mode!r} is not supported; choose 'auto', 'grad' or 'update'")
    names = _names(model)
    optimized = [p for g in optimizer.param_groups for p in g["params"]]
    position_of = {id(p): k for k, p in enumerate(optimized)}
    group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}

    def name_of(p: Tensor) -> str:
        if id(p) in names:
            return names[id(p)]
        where = f"#{position_of[id(p)]} " if id(p) in position_of else ""
        return f"parameter {where}of shape {tuple(p.shape)}"

    masks_ = _resolve_keys(masks, model, "masks", name_of)
    constants_ = _resolve_keys(constant_kernels or {}, model, "constant_kernels", name_of)
    buckets: dict[int, _Bucket] = {}
    for param, value in masks_.items():
        name = name_of(param)
        if id(param) not in group_of:
            raise ConfigError(f"attach_sgs: {name} is not optimized by this optimizer")
        gi = group_of[id(param)]
        bucket = buckets.setdefault(gi, _Bucket(optimizer.param_groups[gi]))
        prepared = _prepare_mask(param, value, name)
        position = len(bucket.params)
        bucket.params.append(param)
        if isinstance(prepared, SpatialPreconditioner):
            bucket.preconditioners[position] = prepared
            prepared = param.new_ones(())
        bucket.masks.append(prepared)
        if param in constants_:
            c = torch.as_tensor(constants_.pop(param)).to(device=param.device, dtype=param.dtype)
            if tuple(c.shape) != tuple(param.shape):
                raise ConfigError(f"{name}: constant kernel of shape {tuple(c.shape)} != parameter shape {tuple(param.shape)}")
            bucket.constants[position] = c
    if constants_:
        raise ConfigError(
            "attach_sgs: constant_kernels given for parameters without a mask: " + ", ".join(map(name_of, constants_))
        )
    attached = _ATTACHED.get(optimizer, set())
    twice = [name_of(p) for p in masks_ if id(p) in attached]
    if twice:
        raise ConfigError(
            f"attach_sgs: {', '.join(twice)} already has SGS attached on this optimizer; attaching again would "
            "scale it twice. Call remove() on the earlier handle first"
        )
    nondiagonal = any(b.preconditioners for b in buckets.values())  # diagonal ones became masks
    reasons = inexact_reasons(optimizer, [b.group for b in buckets.values()], nondiagonal)
    chosen = mode
    if mode == "auto":
        chosen = first_exact(reasons)
        if chosen is None:
            message = (
                "attach_sgs: no exact SGS mode for this configuration: "
                f"grad: {reasons['grad']}; update: {reasons['update']}"
            )
            if strict:
                raise NotEquivalent(message)
            warnings.warn(message + f"; using {FALLBACK_MODE!r}", NotEquivalentWarning, stacklevel=2)
            chosen = FALLBACK_MODE
    elif reasons[mode] is not None:
        message = f"attach_sgs: mode={mode!r} is not exact here: {reasons[mode]}"
        if strict:
            raise NotEquivalent(message + " (pass strict=False to use it anyway)")
        warnings.warn(message, NotEquivalentWarning, stacklevel=2)
    if chosen == "update" and nondiagonal:
        raise ConfigError("attach_sgs: a non-diagonal SpatialPreconditioner can only be applied in mode 'grad'")
    return SGSHandle(optimizer, list(buckets.values()), chosen)
