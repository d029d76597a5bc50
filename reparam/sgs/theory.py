"""Which way of applying SGS reproduces branched training exactly, for a given optimizer.

- ``"grad"`` (scale the gradient before the step) is exact when the optimizer's update is
  linear in the history of gradients and weights: the SGD family (momentum, dampening,
  Nesterov, coupled weight decay, any LR schedule). Weight decay ``wd * W`` of the merged
  kernel equals ``sum_n M_n ⊙ wd * theta_n + wd * C``, hence the ``-wd * C`` correction.
- ``"update"`` (run the optimizer on the raw gradient, scale the update it made) is exact
  when the update is element-wise and independent of the weights: every branch covering a
  tap receives the same gradient there, so it keeps the same state and makes the same step,
  and the merged kernel moves by ``G`` times that step. True for the Adam family, Adagrad,
  RMSprop, Adadelta without coupled weight decay (decoupled decay stays unscaled and pulls
  toward ``C``), and for SGD without weight decay. A non-diagonal preconditioner has no
  element-wise form.

Optimizers are classified by their exact type: a subclass (e.g. a LARS / LAMB-like
``SGD`` or ``Adam`` subclass) may change the update rule, so it is treated as unknown.
"""
from __future__ import annotations

import torch

SGD_FAMILY: tuple[type, ...] = (torch.optim.SGD,)
ELEMENTWISE_ADAPTIVE: tuple[type, ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.Adadelta,
)
#: the ways of applying SGS, in the order ``mode="auto"`` prefers them
SGS_MODES = ("grad", "update")
#: what ``mode="auto"`` uses, with a warning, when no mode is exact (``strict=False``)
FALLBACK_MODE = "grad"


def has_decoupled_decay(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """True if the group's weight decay is applied as ``W <- W (1 - lr wd)`` outside the gradient."""
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


def coupled_decay(optimizer: torch.optim.Optimizer, group: dict) -> float:
    """The weight decay the optimizer adds to the gradient (0 if none or decoupled)."""
    return 0.0 if has_decoupled_decay(optimizer, group) else float(group.get("weight_decay", 0.0) or 0.0)


def decoupled_decay(optimizer: torch.optim.Optimizer, group: dict) -> float:
    """The decoupled weight decay of the group (0 if none or coupled)."""
    return float(group.get("weight_decay", 0.0) or 0.0) if has_decoupled_decay(optimizer, group) else 0.0


def _family(optimizer: torch.optim.Optimizer) -> str | None:
    """``"sgd"``, ``"adaptive"`` or None, by exact type (never by ``isinstance``)."""
    cls = type(optimizer)
    return "sgd" if cls in SGD_FAMILY else "adaptive" if cls in ELEMENTWISE_ADAPTIVE else None


def _unknown_reason(optimizer: torch.optim.Optimizer) -> str:
    name = type(optimizer).__name__
    known = f"SGD (mode 'grad') and {', '.join(c.__name__ for c in ELEMENTWISE_ADAPTIVE)} (mode 'update')"
    base = next((c for c in SGD_FAMILY + ELEMENTWISE_ADAPTIVE if isinstance(optimizer, c)), None)
    if base is not None:
        return (
            f"{name} is a subclass of {base.__name__}: a subclass may change the update rule (e.g. "
            f"LARS / LAMB trust ratios), so exactness is known only for the exact classes {known}"
        )
    return f"{name} is not a supported optimizer: exactness is known for {known}"


def inexact_reasons(optimizer: torch.optim.Optimizer, groups: list[dict], nondiagonal: bool = False) -> dict[str, str | None]:
    """For each mode, ``None`` if it is exact for ``optimizer`` on ``groups``, else the reason."""
    name = type(optimizer).__name__
    coupled = [coupled_decay(optimizer, g) for g in groups]
    family = _family(optimizer)
    if family == "sgd":
        grad = None
        update = (
            None
            if not any(coupled)
            else f"{name} with weight_decay adds wd*W to the gradient before its update; scaling the update "
            "scales that decay too, while each branch decays only its own parameters"
        )
    elif family == "adaptive":
        grad = (
            f"{name} is not linear in the gradient: scaling the gradient before it changes its adaptive "
            "normalization instead of the step each branch makes"
        )
        update = (
            None
            if not any(coupled)
            else f"{name} with coupled weight_decay (L2 added to the gradient) decays each branch's own "
            "parameters inside the adaptive update; no mode is exact (use decoupled decay, e.g. AdamW)"
        )
    else:
        reason = _unknown_reason(optimizer)
        return {"grad": reason, "update": reason}
    if nondiagonal and update is None:
        update = "a non-diagonal preconditioner P = J J^T has no element-wise update form"
    return {"grad": grad, "update": update}


def verdict_inputs(optimizer: torch.optim.Optimizer, groups: list[dict], nondiagonal: bool = False) -> tuple:
    """Everything :func:`inexact_reasons` reads, as a tuple cheap to compare at every step: the
    verdict can change only when this does (keep the two in step)."""
    return (type(optimizer), nondiagonal, tuple(coupled_decay(optimizer, g) != 0 for g in groups))


def radam_first_rectified_step(beta2: float) -> int:
    """The first step ``t`` at which RAdam's variance rectification switches on
    (``rho_t > 5``). Before it RAdam steps with bias-corrected momentum only, which is linear in
    the gradient, so ``"grad"`` mode is exact for trajectories shorter than this."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    t = 1
    while rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t) <= 5.0:
        t += 1
    return t


def _radam_warmup(optimizer: torch.optim.Optimizer, groups: list[dict], steps: int) -> bool:
    return type(optimizer) is torch.optim.RAdam and steps < min(radam_first_rectified_step(g["betas"][1]) for g in groups)


def inexact_reasons_for_steps(
    optimizer: torch.optim.Optimizer, groups: list[dict], steps: int, nondiagonal: bool = False
) -> dict[str, str | None]:
    """:func:`inexact_reasons` for a trajectory of ``steps`` steps: RAdam before its first
    rectified step is SGD-like (bias-corrected momentum of ``d = g + wd W``, linear in ``d``),
    so ``"grad"`` is exact there, with coupled decay (``G g + wd (W - C)``, as for SGD) and with
    decoupled decay (applied unscaled and pulled toward ``C`` by the grad-mode hooks)."""
    reasons = inexact_reasons(optimizer, groups, nondiagonal)
    if reasons["grad"] is not None and _radam_warmup(optimizer, groups, steps):
        reasons["grad"] = None
    return reasons


def why_exact(optimizer: torch.optim.Optimizer, groups: list[dict], mode: str, steps: int | None = None) -> str:
    """Why ``mode`` reproduces branched training exactly for this optimizer (the caller has
    checked with :func:`inexact_reasons_for_steps` that it does)."""
    name = type(optimizer).__name__
    family = _family(optimizer)
    if mode == "grad" and family == "sgd":
        return (
            f"mode 'grad' is exact for {name}: its step is linear in the gradient history, so scaling every "
            "gradient by G (coupled decay pulled toward C) is the step the branches make"
        )
    if mode == "update" and family == "sgd":
        return (
            f"mode 'update' is exact for {name} without weight decay: its step is -lr times a linear "
            "combination of past gradients (momentum, dampening, Nesterov), so scaling the step by G is "
            "the same as scaling every gradient by G"
        )
    if mode == "update":
        return (
            f"mode 'update' is exact for {name}: its step is element-wise, and every branch covering a tap "
            "gets the same gradient there, keeps the same state and makes the same step, so the merged "
            "kernel moves by G times that step (decoupled decay unscaled, toward C)"
        )
    if steps is not None and _radam_warmup(optimizer, groups, steps):
        return (
            f"mode 'grad' is exact for {name} over {steps} steps: before its first rectified step RAdam is "
            "bias-corrected momentum, linear in the gradient (as SGD)"
        )
    return f"mode {mode!r} is exact for {name}"


def first_exact(reasons: dict[str, str | None]) -> str | None:
    """The first mode of :data:`SGS_MODES` (``"grad"`` preferred) that ``reasons`` calls exact, or None."""
    return next((mode for mode in SGS_MODES if reasons[mode] is None), None)


def exact_mode(optimizer: torch.optim.Optimizer, groups: list[dict], nondiagonal: bool = False) -> str | None:
    """The mode that reproduces branched training exactly (``"grad"`` preferred), or None."""
    return first_exact(inexact_reasons(optimizer, groups, nondiagonal))


def auto_mode(optimizer: torch.optim.Optimizer, groups: list[dict], nondiagonal: bool = False) -> str:
    """The mode ``attach_sgs(mode="auto", strict=False)`` applies: the exact one, else the
    :data:`FALLBACK_MODE` it warns about."""
    return exact_mode(optimizer, groups, nondiagonal) or FALLBACK_MODE
