"""Whole models with recognised branched blocks (timm's and others): find them (outermost only:
a block inside a recognised block is never handled again), fuse them into their deploy form, or
turn them into plain deploy-form convs with SGS masks keyed by the deploy parameter names."""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field

from torch import Tensor, nn

from reparam.adapters.analysis import BlockAnalysis, analyse, fused_conv
from reparam.adapters.base import Adapter
from reparam.adapters.native import ReparamBlockAdapter
from reparam.adapters.registry import recognise
from reparam.sgs.preconditioner import SpatialPreconditioner


def find_blocks(model: nn.Module, include_native: bool = False) -> list[tuple[str, Adapter]]:
    """``(name, adapter)`` of every outermost recognised branched block in ``model`` (reparam's own
    :class:`ReparamBlock` only with ``include_native``); modules inside one are never listed."""
    found: list[tuple[str, Adapter]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        adapter = recognise(module)
        if adapter is None or (isinstance(adapter, ReparamBlockAdapter) and not include_native):
            continue
        if not name:
            continue  # the model itself: nothing to replace it in
        found.append((name, adapter))
        inside.append(name)
    return found


def inside_blocks(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Every module inside a recognised branched block (the blocks included): qualified name ->
    ``(block name, block kind)``."""
    names: dict[str, tuple[str, str]] = {}
    for prefix, adapter in find_blocks(model, include_native=True):
        for n, _ in adapter.block.named_modules():
            names[f"{prefix}.{n}" if n else prefix] = (prefix, adapter.kind)
    return names


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        if name and name not in names[id(module)]:
            names[id(module)].append(name)
    return names


def _replace(model: nn.Module, names: list[str], module: nn.Module) -> None:
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


@dataclass
class ForeignLayer:
    """One recognised block: where its deploy conv lives, and what SGS can do for it."""

    block_name: str
    weight: str  # deploy weight name, e.g. "stages.0.0.reparam_conv.weight"
    analysis: BlockAnalysis | None  # None from fuse_foreign (fusion only)

    @property
    def bias(self) -> str:
        return self.weight[: -len("weight")] + "bias"


@dataclass
class ForeignSGS:
    """``to_sgs_foreign`` result: the deploy-form model, masks / constants keyed by deploy names,
    bias masks, and one :class:`ForeignLayer` per block."""

    model: nn.Module
    masks: dict[str, Tensor | SpatialPreconditioner] = field(default_factory=dict)
    constants: dict[str, Tensor] = field(default_factory=dict)
    layers: list[ForeignLayer] = field(default_factory=list)


def fuse_foreign(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, list[ForeignLayer]]:
    """Replace every recognised foreign block by its deploy form (as ``timm.utils.
    reparameterize_model`` does) holding the float64 fused kernel cast to the model's dtype."""
    result = _deploy_all(model, inplace, analysed=False)
    return result.model, result.layers


def to_sgs_foreign(model: nn.Module, *, inplace: bool = False) -> ForeignSGS:
    """Deploy form of every recognised block plus what SGS needs to train it: ``masks[w]`` (exact
    ``J J^T`` where the block is linear in its parameters, else the mask-sum), ``constants[w]``
    (``C``, for weight decay), bias masks (keyed by the bias name) where the bias gradient is
    scaled; a bias no trainable parameter moves is frozen (``requires_grad=False``). A frozen
    block (no trainable parameter) gives a frozen conv and no mask."""
    result = _deploy_all(model, inplace, analysed=True)
    for layer in result.layers:
        a = layer.analysis
        if not result.model.get_parameter(layer.weight).requires_grad:
            continue
        result.masks[layer.weight] = a.mask
        if a.constant is not None:
            result.constants[layer.weight] = a.constant
        if a.bias_mask is not None:
            result.masks[layer.bias] = a.bias_mask
        if not a.bias_trains:
            result.model.get_parameter(layer.bias).requires_grad_(False)
    return result


def _deploy_all(model: nn.Module, inplace: bool, analysed: bool) -> ForeignSGS:
    """Every recognised block in its deploy form (with its SGS analysis if ``analysed``)."""
    target = model if inplace else copy.deepcopy(model)
    names = _aliases(target)
    result = ForeignSGS(target)
    for name, adapter in find_blocks(target):
        analysis = analyse(adapter) if analysed else None
        weight, bias = (analysis.weight, analysis.bias) if analysis is not None else fused_conv(adapter)
        deployed = adapter.deploy(weight, bias)
        if not any(p.requires_grad for p in adapter.block.parameters()):
            deployed.requires_grad_(False)  # a frozen block stays frozen
        _replace(target, names[id(adapter.block)], deployed)
        result.layers.append(ForeignLayer(name, f"{name}.{adapter.weight_suffix()}", analysis))
    return result

