"""One analysis for every branched block: fused conv (impulse response, float64), the exact
``P = J J^T`` (autograd) reduced to a mask or preconditioner, or the mask-sum and why it is
only approximate."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from reparam.adapters.base import Adapter
from reparam.errors import ConversionError
from reparam.kernels.response import check_conv
from reparam.sgs.jacobian import TOLERANCE, Reduction, affinity_defect, jacobian_reduction
from reparam.sgs.preconditioner import SpatialPreconditioner


@dataclass
class BlockAnalysis:
    """Everything SGS needs about one branched block.

    ``weight``/``bias``: the fused eval-mode conv (float64). ``mask``: ``G`` broadcastable to the
    kernel or a :class:`SpatialPreconditioner`; exact when ``exact`` (``P = J J^T``), else the
    mask-sum with ``reasons``. ``constant``: the parameter-free part ``C`` of the kernel (None if
    0 or unknown); ``bias_mask``: the bias gradient's factor (None for 1); ``bias_trains``: False
    when no trainable parameter moves the fused bias (the plain conv's bias is then frozen).
    """

    kind: str
    weight: Tensor
    bias: Tensor
    exact: bool
    mask: Tensor | SpatialPreconditioner
    reasons: list[str] = field(default_factory=list)
    constant: Tensor | None = None
    bias_mask: Tensor | None = None
    bias_trains: bool = True
    bn: str = "none"  # BatchNorm inside the branches: "none", "train" (batch statistics) or "eval"

    @property
    def form(self) -> str:
        """How SGS applies: 'mask (kh, kw)', 'per-channel mask', 'preconditioner'."""
        if isinstance(self.mask, SpatialPreconditioner):
            return "preconditioner"
        return "mask" if self.mask.ndim == 2 else "per-channel mask"


def _batchnorms(core: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in core.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _training_reasons(block: nn.Module, core: nn.Module, weight: Tensor, bias: Tensor, geometry) -> list[str]:
    """Why the core, in its own train/eval flags, is not the conv ``(weight, bias)`` while it trains
    (modules named relative to ``block``)."""
    names = {id(m): n for n, m in block.named_modules()}
    live = [names.get(id(m), n) or "(block)" for n, m in _batchnorms(core) if m.training or m.running_mean is None]
    if live:
        return [f"BatchNorm inside the branches in training mode ({', '.join(live)}): its batch statistics depend "
                "on the branch weights, so no constant gradient scaling reproduces it (approximate; exact for the "
                "same block with BN removed or frozen in eval mode)"]
    if not any(m.training for m in core.modules()):
        return []
    twin = copy.deepcopy(core).to(torch.float64)
    with torch.no_grad():
        err = check_conv(twin, geometry, weight, bias)
    if err > TOLERANCE:
        return [f"in training mode the block does not compute the conv it fuses to (relative difference {err:.1e}: "
                "dropout, drop-path or batch statistics inside)"]
    return []


def _merge_function(kernel: nn.Module, names: list[str]):
    def merge(theta: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        return torch.func.functional_call(kernel, dict(zip(names, theta)), ())
    return merge


def _exact_form(merge, theta: tuple[Tensor, ...], kind: str) -> tuple[Reduction | None, list[str]]:
    if not theta:
        return None, [f"{kind} has no trainable parameter in its branches"]
    defect = affinity_defect(merge, theta)
    if defect > TOLERANCE:
        return None, [f"the fused kernel is not linear in the trainable parameters (second difference {defect:.1e}): "
                      "a product of two trainable tensors, e.g. a BatchNorm or layer-scale weight times a conv "
                      "kernel; freeze one factor (requires_grad_(False)) for an exact form"]
    reduction = jacobian_reduction(merge, theta)
    return reduction, ([] if reduction.weight is not None else [reduction.reason or "P = J J^T is not reducible"])


@dataclass
class _Merge:
    """The block's fused conv as a function of its trainable parameters (float64 copy, eval mode)."""

    merge: Callable[[tuple[Tensor, ...]], tuple[Tensor, Tensor]]
    theta: tuple[Tensor, ...]
    weight: Tensor
    bias: Tensor


def _fused(adapter: Adapter) -> _Merge:
    """Fuse a float64 eval-mode copy and check the result against the block's own forward."""
    geometry = adapter.geometry()
    kernel = copy.deepcopy(adapter.kernel_module()).to(torch.float64).eval()
    names = [n for n, p in kernel.named_parameters() if p.requires_grad]
    theta = tuple(p.detach() for n, p in kernel.named_parameters() if p.requires_grad)
    merge = _merge_function(kernel, names)
    with torch.no_grad():
        weight, bias = merge(theta)
        err = check_conv(kernel.core, geometry, weight, bias)
    if err > TOLERANCE:
        raise ConversionError(
            f"{adapter.kind}: in eval mode it is not a conv with {geometry} (relative difference {err:.1e}); "
            "is it affine in its input, and is the geometry right?"
        )
    return _Merge(merge, theta, weight, bias)


def fused_conv(adapter: Adapter) -> tuple[Tensor, Tensor]:
    """The block's eval-mode function as one conv ``(weight, bias)`` in float64 (checked)."""
    fused = _fused(adapter)
    return fused.weight, fused.bias


def analyse(adapter: Adapter) -> BlockAnalysis:
    """Analyse the block behind ``adapter`` (nothing of it is modified)."""
    fused = _fused(adapter)
    merge, theta, weight, bias = fused.merge, fused.theta, fused.weight, fused.bias
    geometry = adapter.geometry()
    norms = _batchnorms(adapter.core())
    bn = "none" if not norms else "train" if any(m.training for _, m in norms) else "eval"
    reasons = _training_reasons(adapter.block, adapter.core(), weight, bias, geometry)
    reduction = None
    if not reasons:
        reduction, reasons = _exact_form(merge, theta, adapter.kind)
    if reduction is None or reduction.weight is None:
        return BlockAnalysis(adapter.kind, weight, bias, False, adapter.approximate_mask(), reasons, bn=bn)
    with torch.no_grad():
        constant = merge(tuple(torch.zeros_like(t) for t in theta))[0]
    return BlockAnalysis(
        adapter.kind, weight, bias, True, reduction.weight, [],
        constant=constant if bool(constant.abs().max() > 0) else None,
        bias_mask=reduction.bias, bias_trains=reduction.bias_trains, bn=bn,
    )
