"""``attach_sgs``: apply spatial gradient scaling through an optimizer's step hooks."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping, Union

import torch
from torch import Tensor, nn

from reparam.errors import ConfigError, NotEquivalent
from reparam.sgs.preconditioner import SpatialPreconditioner
from reparam.sgs.theory import coupled_decay, decoupled_decay, inexact_reasons

MaskValue = Union[Tensor, SpatialPreconditioner]


class NotEquivalentWarning(UserWarning):
    """SGS was attached in a way that does not reproduce branched training exactly."""


@dataclass
class _Bucket:
    """The masked parameters of one optimizer param group."""

    group: dict
    params: list[nn.Parameter] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    constants: dict[int, Tensor] = field(default_factory=dict)  # index in params -> C
    preconditioners: dict[int, SpatialPreconditioner] = field(default_factory=dict)
    snapshots: list[Tensor] = field(default_factory=list)
    active: list[int] = field(default_factory=list)


class SGSHandle:
    """Returned by :func:`attach_sgs`; ``remove()`` detaches the hooks."""

    def __init__(self, optimizer: torch.optim.Optimizer, buckets: list[_Bucket], mode: str) -> None:
        self.optimizer = optimizer
        self.mode = mode
        self._buckets = buckets
        if mode == "grad":
            self._hooks = [
                optimizer.register_step_pre_hook(self._scale_gradients),
                optimizer.register_step_post_hook(self._decay_toward_constants),
            ]
        else:
            for bucket in buckets:
                bucket.snapshots = [torch.empty_like(p) for p in bucket.params]
            self._hooks = [
                optimizer.register_step_pre_hook(self._snapshot),
                optimizer.register_step_post_hook(self._scale_updates),
            ]

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for b in self._buckets for p in b.params]

    def remove(self) -> None:
        """Detach from the optimizer (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> "SGSHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- grad mode -----------------------------------------------------------------------
    def _scale_gradients(self, optimizer, args, kwargs) -> None:
        for bucket in self._buckets:
            bucket.active = [i for i, p in enumerate(bucket.params) if p.grad is not None]
            idx = [i for i in bucket.active if i not in bucket.preconditioners]
            if idx:
                torch._foreach_mul_([bucket.params[i].grad for i in idx], [bucket.masks[i] for i in idx])
            for i, precond in bucket.preconditioners.items():
                if bucket.params[i].grad is not None:
                    precond.apply_(bucket.params[i].grad)
            wd = coupled_decay(optimizer, bucket.group)
            with_c = [i for i in bucket.active if i in bucket.constants]
            if wd and with_c:
                # d = G g + wd W must equal G g + wd (W - C): shift the gradient by -wd C
                # (+wd C when the optimizer negates the gradient for maximize).
                sign = 1.0 if bucket.group.get("maximize", False) else -1.0
                torch._foreach_add_(
                    [bucket.params[i].grad for i in with_c], [bucket.constants[i] for i in with_c], alpha=sign * wd
                )

    @torch.no_grad()
    def _decay_toward_constants(self, optimizer, args=None, kwargs=None) -> None:
        """Decoupled decay ``W <- (1 - lr wd) W`` pulls the merged kernel toward 0, while each
        branch decays only its own parameters, i.e. ``W - C`` toward 0: add back ``lr wd C``."""
        for bucket in self._buckets:
            wd = decoupled_decay(optimizer, bucket.group)
            with_c = [i for i in bucket.active if i in bucket.constants]
            if wd and with_c:
                lr = float(bucket.group["lr"])
                torch._foreach_add_([bucket.params[i] for i in with_c], [bucket.constants[i] for i in with_c], alpha=lr * wd)

    # -- update mode ---------------------------------------------------------------------
    def _snapshot(self, optimizer, args, kwargs) -> None:
        for bucket in self._buckets:
            bucket.active = [i for i, p in enumerate(bucket.params) if p.grad is not None]
            _copy_all([bucket.snapshots[i] for i in bucket.active], [bucket.params[i].detach() for i in bucket.active])

    @torch.no_grad()
    def _scale_updates(self, optimizer, args, kwargs) -> None:
        for bucket in self._buckets:
            idx = bucket.active
            if not idx:
                continue
            params = [bucket.params[i] for i in idx]
            before = [bucket.snapshots[i] for i in idx]
            wd = decoupled_decay(optimizer, bucket.group)
            lr = float(bucket.group["lr"])
            if wd:
                # The optimizer did W <- W (1 - lr wd) + step; keep the decay unscaled.
                torch._foreach_mul_(before, 1.0 - lr * wd)
            torch._foreach_sub_(params, before)  # the optimizer's step
            torch._foreach_mul_(params, [bucket.masks[i] for i in idx])
            torch._foreach_add_(params, before)
        self._decay_toward_constants(optimizer)


def _copy_all(destinations: list[Tensor], sources: list[Tensor]) -> None:
    if not destinations:
        return
    if hasattr(torch, "_foreach_copy_"):  # torch >= 2.2
        torch._foreach_copy_(destinations, sources)
    else:
        for dst, src in zip(destinations, sources):
            dst.copy_(src)


def _names(model: nn.Module | None) -> dict[int, str]:
    return {} if model is None else {id(p): n for n, p in model.named_parameters()}


def _resolve_keys(masks: Mapping, model: nn.Module | None, what: str) -> dict[nn.Parameter, MaskValue]:
    resolved = {}
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
        resolved[key] = value
    if missing:
        raise ConfigError(f"{what}: no parameter named {missing} in the model")
    return resolved


def _prepare_mask(param: nn.Parameter, value: MaskValue, name: str) -> MaskValue:
    if isinstance(value, SpatialPreconditioner):
        taps = param.shape[-2] * param.shape[-1] if param.ndim == 4 else -1
        if param.ndim != 4 or value.taps != taps:
            raise ConfigError(
                f"{name}: a preconditioner over {value.taps} taps does not fit a parameter of shape {tuple(param.shape)}"
            )
        return SpatialPreconditioner(value.matrix.to(device=param.device, dtype=param.dtype))
    mask = torch.as_tensor(value).to(device=param.device, dtype=param.dtype)
    if not torch.isfinite(mask).all():
        raise ConfigError(f"{name}: the mask has non-finite values")
    if mask.ndim == 2 and param.ndim == 4 and tuple(mask.shape) != tuple(param.shape[-2:]):
        raise ConfigError(
            f"{name}: mask of shape {tuple(mask.shape)} does not match the kernel size {tuple(param.shape[-2:])}"
        )
    try:
        return mask.expand(param.shape)
    except RuntimeError:
        raise ConfigError(
            f"{name}: mask of shape {tuple(mask.shape)} is not broadcastable to the parameter shape {tuple(param.shape)}"
        ) from None


def attach_sgs(
    optimizer: torch.optim.Optimizer,
    masks: Mapping[Union[nn.Parameter, str], MaskValue],
    mode: str = "auto",
    strict: bool = True,
    constant_kernels: Mapping[Union[nn.Parameter, str], Tensor] | None = None,
    model: nn.Module | None = None,
) -> SGSHandle:
    """Make ``optimizer`` train each masked parameter as if it were a branched block.

    ``masks`` maps a parameter (or, with ``model``, its name) to ``G`` of shape ``(kh, kw)``
    or broadcastable to the weight, or to a :class:`SpatialPreconditioner` ``P``.

    - ``mode="grad"``: ``g <- G ⊙ g`` (``P g``) before the step, and ``g <- g - wd C`` for
      constant kernels under coupled weight decay. Exact for the SGD family.
    - ``mode="update"``: the optimizer steps on the raw gradient, then
      ``W <- W_dec + G ⊙ (W_after - W_dec)`` with ``W_dec = (1 - lr wd) W_before`` under
      decoupled decay (which stays unscaled and pulls toward ``C``). Exact for element-wise
      adaptive optimizers (Adam, AdamW, Adamax, NAdam, RAdam, Adagrad, RMSprop, Adadelta)
      without coupled weight decay.
    - ``mode="auto"``: the exact one for this optimizer. If none exists (or an explicit mode
      is not exact), ``strict=True`` raises :class:`reparam.NotEquivalent` with the reason and
      ``strict=False`` warns (:class:`NotEquivalentWarning`) and goes on (``"grad"`` for auto).

    ``constant_kernels`` maps parameters to the parameter-free part ``C`` of their merged
    kernel (RepVGG's identity without BN) so that weight decay pulls toward ``C``.
    Returns a handle; ``handle.remove()`` detaches.
    """
    if mode not in ("auto", "grad", "update"):
        raise ConfigError(f"attach_sgs: mode={mode!r} is not supported; choose 'auto', 'grad' or 'update'")
    names = _names(model)
    masks_ = _resolve_keys(masks, model, "masks")
    constants_ = _resolve_keys(constant_kernels or {}, model, "constant_kernels")
    group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}

    def name_of(p: nn.Parameter, index: int) -> str:
        return names.get(id(p), f"parameter #{index} of shape {tuple(p.shape)}")

    buckets: dict[int, _Bucket] = {}
    for index, (param, value) in enumerate(masks_.items()):
        name = name_of(param, index)
        if id(param) not in group_of:
            raise ConfigError(f"attach_sgs: {name} is not optimized by this optimizer")
        gi = group_of[id(param)]
        bucket = buckets.setdefault(gi, _Bucket(optimizer.param_groups[gi]))
        prepared = _prepare_mask(param, value, name)
        position = len(bucket.params)
        bucket.params.append(param)
        if isinstance(prepared, SpatialPreconditioner):
            bucket.preconditioners[position] = prepared
            bucket.masks.append(torch.ones((), dtype=param.dtype, device=param.device).expand(param.shape))
        else:
            bucket.masks.append(prepared)
        if param in constants_:
            c = torch.as_tensor(constants_.pop(param)).to(device=param.device, dtype=param.dtype)
            if tuple(c.shape) != tuple(param.shape):
                raise ConfigError(f"{name}: constant kernel of shape {tuple(c.shape)} != parameter shape {tuple(param.shape)}")
            bucket.constants[position] = c
    if constants_:
        raise ConfigError(
            "attach_sgs: constant_kernels given for parameters without a mask: "
            + ", ".join(name_of(p, i) for i, p in enumerate(constants_))
        )
    nondiagonal = any(not p.is_diagonal() for b in buckets.values() for p in b.preconditioners.values())
    reasons = inexact_reasons(optimizer, [b.group for b in buckets.values()], nondiagonal)
    chosen = mode
    if mode == "auto":
        chosen = next((m for m in ("grad", "update") if reasons[m] is None), None)
        if chosen is None:
            message = f"attach_sgs: no exact SGS mode for this configuration: grad: {reasons['grad']}; update: {reasons['update']}"
            if strict:
                raise NotEquivalent(message)
            warnings.warn(message + "; using 'grad'", NotEquivalentWarning, stacklevel=2)
            chosen = "grad"
    elif reasons[mode] is not None:
        message = f"attach_sgs: mode={mode!r} is not exact here: {reasons[mode]}"
        if strict:
            raise NotEquivalent(message + " (pass strict=False to use it anyway)")
        warnings.warn(message, NotEquivalentWarning, stacklevel=2)
    if chosen == "update" and nondiagonal:
        raise ConfigError("attach_sgs: a non-diagonal SpatialPreconditioner can only be applied in mode 'grad'")
    return SGSHandle(optimizer, list(buckets.values()), chosen)
