"""Build one training variant: a model, its optimizer and (for SGS) the attached masks.

Variants (one table row each):

- ``plain``: the unmodified model, SGD with momentum.
- ``plain-adamw``: the unmodified model, AdamW: the reference for ``sgs-update``.
- ``sgs-grad``: the model converted to ACB blocks with ``bn="after"`` and turned back into
  plain convs by :func:`reparam.convert.to_sgs`; the masks ``G`` (and constant kernels) are
  applied by :func:`reparam.sgs.attach_sgs` in ``mode="grad"`` under SGD with momentum.
  The trained network has the plain architecture (conv without bias + BN).
- ``sgs-update``: the same masks in ``mode="update"`` under AdamW (keeps a snapshot of the
  masked weights between the pre- and post-step hooks).
- ``acb`` / ``repvgg`` / ``dbb``: blocks with a BatchNorm in every branch (``bn="branch"``).
- ``<block>-after``: blocks with one BatchNorm after the sum, branched forward.
- ``<block>-merged``: the same blocks in ``mode="merged"`` (one conv per step on the
  differentiably merged kernel).

Every variant except ``plain-adamw`` and ``sgs-update`` uses SGD(lr=0.01, momentum=0.9,
weight_decay=5e-4); those two use AdamW(lr=1e-3, weight_decay=5e-4). Hyper-parameters do not change cost.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reparam.blocks import BLOCKS, ReparamBlock
from reparam.convert import convert_model, to_sgs
from reparam.sgs import attach_sgs

BLOCK_NAMES = tuple(BLOCKS)
SGS_VARIANTS = ("sgs-grad", "sgs-update")
VARIANTS: tuple[str, ...] = (
    "plain",
    "plain-adamw",
    *SGS_VARIANTS,
    *BLOCK_NAMES,
    *(f"{b}-after" for b in BLOCK_NAMES),
    *(f"{b}-merged" for b in BLOCK_NAMES),
)
SGS_SOURCE_BLOCK = "acb"  # the conversion whose masks the sgs-* rows use
SGS_SOURCE_BN = "after"

LR_SGD, MOMENTUM, LR_ADAMW, WEIGHT_DECAY = 0.01, 0.9, 1e-3, 5e-4


@dataclass
class Variant:
    """A ready-to-train variant."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    handle: Any = None  # SGSHandle for sgs-* rows
    info: dict = field(default_factory=dict)  # params, masked params, extra SGS state bytes


def parse_variant(name: str) -> tuple[str, str | None, str | None]:
    """``name -> (kind, block, bn/mode)`` where kind is plain, sgs or block."""
    if name == "plain":
        return "plain", None, None
    if name == "plain-adamw":
        return "plain", None, "adamw"
    if name in SGS_VARIANTS:
        return "sgs", SGS_SOURCE_BLOCK, name.split("-", 1)[1]
    block, _, suffix = name.partition("-")
    if block in BLOCK_NAMES and suffix in ("", "after", "merged"):
        return "block", block, suffix or "branch"
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def resolve_variants(names: list[str] | None) -> list[str]:
    """Validate names (``all`` = every variant); ``plain`` is always measured first."""
    if not names or names == ["all"]:
        return list(VARIANTS)
    for n in names:
        parse_variant(n)
    return ["plain"] + [n for n in dict.fromkeys(names) if n != "plain"]


def preload(spec: str) -> None:
    """Import everything building and training a variant of model ``spec`` needs (the
    converters, blocks and SGS hooks, ``torchvision.models`` or the spec's module, and
    ``torch._dynamo``, which ``torch.optim.Optimizer`` imports on first use), so that a memory
    baseline taken afterwards does not count library imports (~150 MiB of RSS).
    An import error of the spec's module is left for :func:`load_model` to report."""
    for name in ("reparam.convert", "reparam.blocks", "reparam.sgs", "torch._dynamo"):
        importlib.import_module(name)
    source = spec.partition(":")[0]
    with contextlib.suppress(ImportError):
        importlib.import_module("torchvision.models" if source == "torchvision" else source)


# -- building ------------------------------------------------------------------------------
@dataclass
class Converted:
    """A variant's model before it goes to the device (the costly part of a build: tracing
    and converting run on the CPU), with the SGS masks and constant kernels for ``sgs-*``."""

    model: nn.Module
    blocks: int = 0
    masks: dict | None = None
    constants: dict | None = None


def _count_blocks(model: nn.Module) -> int:
    return sum(isinstance(m, ReparamBlock) for m in model.modules())


def conversion_of(name: str) -> tuple:
    """Variants with equal keys train the same converted model (``acb`` / ``acb-merged``,
    ``plain`` / ``plain-adamw``, ``sgs-grad`` / ``sgs-update``)."""
    kind, block, option = parse_variant(name)
    if kind == "block":
        return kind, block, "branch" if option == "branch" else "after"
    return (kind,)


def convert_variant(name: str, model_factory: Callable[[], nn.Module]) -> Converted:
    """Build a fresh model and convert it as variant ``name`` trains it (on the CPU)."""
    conversion = conversion_of(name)
    model = model_factory()
    if conversion[0] == "block":
        model = convert_model(model, block=conversion[1], bn=conversion[2])
        return Converted(model, _count_blocks(model))
    if conversion[0] == "sgs":
        branched = convert_model(model, block=SGS_SOURCE_BLOCK, bn=SGS_SOURCE_BN)
        result = to_sgs(branched)
        return Converted(result.model, _count_blocks(branched), result.masks, result.constants)
    return Converted(model)


class BuildCache:
    """Converted models of one model spec, kept between the rows of a run and deep-copied for
    each row (rows never share weights or optimizer state): a vgg16_bn conversion takes
    seconds, the copy a fraction of one. For rows that run in this process on a GPU; a CPU row's
    peak RSS would count the cache, so CPU rows run isolated and build afresh."""

    def __init__(self) -> None:
        self._spec: str | None = None
        self._store: dict[tuple, Converted] = {}

    def converted(self, spec: str, name: str, model_factory: Callable[[], nn.Module]) -> Converted:
        if spec != self._spec:  # keep one model's conversions at a time
            self._spec, self._store = spec, {}
        key = conversion_of(name)
        if key not in self._store:
            self._store[key] = convert_variant(name, model_factory)
        return copy.deepcopy(self._store[key])


def _optimizer(params: list[nn.Parameter], adamw: bool) -> torch.optim.Optimizer:
    if adamw:
        return torch.optim.AdamW(params, lr=LR_ADAMW, weight_decay=WEIGHT_DECAY)
    return torch.optim.SGD(params, lr=LR_SGD, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def build_variant(
    name: str,
    model_factory: Callable[[], nn.Module],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    converted: Converted | None = None,
) -> Variant:
    """Variant ``name`` on ``device``: ``converted`` (else :func:`convert_variant` of a fresh
    ``model_factory()``), its optimizer and, for ``sgs-*``, the attached masks."""
    kind, _, option = parse_variant(name)
    converted = converted or convert_variant(name, model_factory)
    model = converted.model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    if option == "merged":
        for module in model.modules():
            if isinstance(module, ReparamBlock):
                module.mode = "merged"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, adamw=option in ("update", "adamw"))
    info: dict[str, Any] = {"blocks": converted.blocks, "masked_params": 0, "sgs_state_bytes": 0}
    handle = None
    if kind == "sgs":
        handle = attach_sgs(optimizer, converted.masks, mode=option, constant_kernels=converted.constants or None,
                            model=model)
        # masks/constants now live (cast, on device) inside the handle; the snapshot of the
        # masked weights is allocated once in update mode.
        info["masked_params"] = len(handle.parameters)
        info["sgs_state_bytes"] = handle.state_bytes
    info["params"] = sum(p.numel() for p in model.parameters())
    info["trainable_params"] = sum(p.numel() for p in params)
    return Variant(name, model, optimizer, handle, info)
