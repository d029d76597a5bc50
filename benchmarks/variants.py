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
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

BLOCK_NAMES = ("acb", "repvgg", "dbb")
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


# -- the model conversion API (reparam.convert) -------------------------------------------
def _convert_module():
    try:
        return importlib.import_module("reparam.convert")
    except ImportError as exc:  # pragma: no cover - only before reparam.convert exists
        raise RuntimeError(f"reparam.convert is not available ({exc}); it provides the model loader and converters") from exc


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


def load_model(spec: str) -> nn.Module:
    """Instantiate ``torchvision:<name>`` (random weights) or ``module:callable``
    (:func:`reparam.convert.load_model`)."""
    return _convert_module().load_model(spec)


def convert_model(model: nn.Module, block: str, bn: str) -> nn.Module:
    return _convert_module().convert_model(model, block=block, bn=bn)


def to_sgs(model: nn.Module):
    return _convert_module().to_sgs(model)


# -- building ------------------------------------------------------------------------------
def _set_merged(model: nn.Module) -> int:
    from reparam.blocks import ReparamBlock

    count = 0
    for module in model.modules():
        if isinstance(module, ReparamBlock):
            module.mode = "merged"
            count += 1
    return count


def _count_blocks(model: nn.Module) -> int:
    from reparam.blocks import ReparamBlock

    return sum(isinstance(m, ReparamBlock) for m in model.modules())


def build_variant(
    name: str,
    model_factory: Callable[[], nn.Module],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> Variant:
    """Build variant ``name`` from a fresh model (``model_factory()``), on ``device``."""
    kind, block, option = parse_variant(name)
    model = model_factory()
    info: dict[str, Any] = {"blocks": 0, "masked_params": 0, "sgs_state_bytes": 0}
    masks = constants = None
    if kind == "block":
        bn = "branch" if option == "branch" else "after"
        model = convert_model(model, block=block, bn=bn)
        if option == "merged":
            _set_merged(model)
        info["blocks"] = _count_blocks(model)
    elif kind == "sgs":
        converted = convert_model(model, block=block, bn=SGS_SOURCE_BN)
        info["blocks"] = _count_blocks(converted)
        result = to_sgs(converted)
        model, masks, constants = result[0], result[1], result[2]
        del converted
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if option in ("update", "adamw"):
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=LR_ADAMW, weight_decay=WEIGHT_DECAY)
    else:
        optimizer = torch.optim.SGD(params, lr=LR_SGD, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    handle = None
    if kind == "sgs":
        from reparam.sgs import attach_sgs

        handle = attach_sgs(optimizer, masks, mode=option, constant_kernels=constants or None, model=model)
        # masks/constants now live (cast, on device) inside the handle; the snapshot of the
        # masked weights is allocated once in update mode.
        info["masked_params"] = len(handle.parameters)
        info["sgs_state_bytes"] = handle.state_bytes
    info["params"] = sum(p.numel() for p in model.parameters())
    info["trainable_params"] = sum(p.numel() for p in params)
    return Variant(name, model, optimizer, handle, info)
