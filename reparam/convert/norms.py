"""The BatchNorm part of an absorbed BatchNorm-like module, and what stays in its slot.

Kinds come from :func:`reparam.convert.graph.norm_kind`. The block gets the BatchNorm part
(``nn.BatchNorm2d``, ``nn.SyncBatchNorm`` and frozen BatchNorms as deep copies, so class,
``eps``, ``momentum``, ``requires_grad`` and train/eval mode survive; the BN inside timm's
``BatchNormAct2d`` as an ``nn.BatchNorm2d``). The slot keeps ``nn.Identity`` for a plain
BatchNorm2d, else an :class:`AbsorbedNorm` that runs what followed the BN (drop, act) and can
:meth:`~AbsorbedNorm.restore` a module of the original class for :func:`~reparam.convert.to_sgs`.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from reparam.convert.graph import PLAIN, WITH_REST

_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@torch.no_grad()
def _copy_state(target: nn.Module, source: nn.Module) -> None:
    """Copy the BatchNorm tensors of ``source`` into ``target`` (same attributes), with
    ``source``'s ``requires_grad`` and train/eval mode."""
    for name in _STATE:
        src, dst = getattr(source, name, None), getattr(target, name, None)
        if isinstance(src, Tensor) and isinstance(dst, Tensor):
            dst.copy_(src)
            if isinstance(dst, nn.Parameter):
                dst.requires_grad_(src.requires_grad)
    target.train(source.training)


def norm_part(module: nn.Module, kind: str) -> nn.Module:
    """A module computing only the BatchNorm of ``module`` (a copy: ``module`` is not changed)."""
    if kind != WITH_REST:
        return copy.deepcopy(module)
    ref = module.running_mean
    part = nn.BatchNorm2d(ref.numel(), eps=module.eps, momentum=module.momentum, device=ref.device, dtype=ref.dtype)
    _copy_state(part, module)
    return part


class AbsorbedNorm(nn.Module):
    """The slot of an absorbed BatchNorm-like ``original`` that is not a plain BatchNorm2d: runs
    the child modules that followed the BatchNorm (timm's drop, act; under their own names, so
    the state-dict keys stay) and remembers the original class for :meth:`restore`."""

    def __init__(self, original: nn.Module, kind: str) -> None:
        super().__init__()
        self.kind = kind
        children = dict(original.named_children()) if kind == WITH_REST else {}
        for name, child in children.items():
            self.add_module(name, child)
        template = copy.copy(original)  # shallow: the tensors are replaced in restore()
        template._modules = {}
        self._template = [template]  # a list: not a submodule, not in the state dict
        self._child_names = list(children)

    def forward(self, x: Tensor) -> Tensor:
        for child in self.children():
            x = child(x)
        return x

    def restore(self, bn: nn.Module) -> nn.Module:
        """A module of the original class computing ``bn`` then this slot's children."""
        restored = copy.deepcopy(self._template[0])
        restored._modules = dict(self._modules)
        ref = bn.running_mean
        restored.to(device=ref.device, dtype=ref.dtype)
        _copy_state(restored, bn)
        return restored

    def extra_repr(self) -> str:
        return f"absorbed {type(self._template[0]).__name__}"


def slot_module(module: nn.Module, kind: str) -> nn.Module:
    """What replaces the absorbed ``module`` in the model."""
    return nn.Identity() if kind == PLAIN else AbsorbedNorm(module, kind)
